"""How a command's process ends: the interpreter's teardown is not made to collect the whole heap again."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # its own process: the exit is what is tested

# An exit handler registered before the command (so run after the command's own) reports what the command's
# handler left; a reference cycle with a finalizer, made after the command, must still be finalized.
SCRIPT = textwrap.dedent("""
    import atexit, gc, sys

    atexit.register(lambda: print(f"frozen objects at exit: {gc.get_freeze_count() > 0}", flush=True))
    from lm_lightning import cli

    sys.argv = ["lm-lightning", "estimate", "model.n_layer=2"]
    cli.main()

    class Cycle:
        def __del__(self):
            print("cycle finalized", flush=True)

    gc.disable()  # only an explicit collection finalizes the cycle now
    cycle = Cycle()
    cycle.self = cycle
    del cycle
""")


def test_a_command_collects_once_and_freezes_the_heap_before_the_interpreter_teardown(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "frozen objects at exit: True" in lines, proc.stdout[-2000:]
    assert lines.index("cycle finalized") < lines.index("frozen objects at exit: True"), "collected, then frozen"
