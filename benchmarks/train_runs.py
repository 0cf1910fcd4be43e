"""One training run of a loss benchmark, trained once: a later invocation reads the run's record instead, and a run
that was stopped part-way (its process killed, the machine taken back) resumes from its last.ckpt."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def final_val_loss(run_dir: Path, overrides: list[str], cwd: Path) -> float:
    """The final validation loss (nats/token) of ``lm-lightning train <overrides>`` in ``run_dir``, trained (at low
    priority, beside other work) unless its run.json exists; resumed (``ckpt_path=last``) where the run folder holds a
    last.ckpt but no run.json."""
    record = run_dir / "run.json"
    if not record.is_file():
        resume = ["ckpt_path=last"] if (run_dir / "checkpoints" / "last.ckpt").is_file() else []
        if resume:
            print(f"resuming {run_dir} from its last.ckpt", flush=True)
        proc = subprocess.run(["nice", "-n", "10", sys.executable, "-m", "lm_lightning", "train", *overrides, *resume,
                               f"hydra.run.dir={run_dir}"], cwd=cwd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"run failed: {' '.join(overrides)}\n{proc.stderr[-3000:]}")
    return json.loads(record.read_text())["final"]["val/loss"]
