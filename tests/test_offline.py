"""Offline means offline: with no W&B variables and no login, a tracked training run connects to nothing
outside the loopback address (wandb 0.31 sent telemetry to its server unless WANDB_MODE was exported)."""

import ipaddress
import os
import shutil
import subprocess
import sys

import pytest
from helpers import SHARED_DATA

# records every name lookup and connection of the Python processes (the command and any child Python)
AUDIT = '''
import sys
def _audit(event, args):
    if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex"):
        with open({log!r}, "a") as f:
            f.write(f"{{event}} {{args[1] if event == 'socket.connect' else args[0]!r}}\\n")
sys.addaudithook(_audit)
'''


def _loopback_or_local(address: str) -> bool:
    """True for a Unix socket path, a loopback IP or ``localhost``."""
    address = address.strip("'\"()")
    host = address.split(",")[0].strip("'\" ")
    if host.startswith("/") or host in ("localhost", "", "None"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.mark.slow
def test_train_without_wandb_login_connects_to_nothing_outside_loopback(tmp_path, corpus_cache):
    home = tmp_path / "home"  # no ~/.netrc, no ~/.config/wandb: a user who never logged in
    home.mkdir()
    hook = tmp_path / "hook"
    hook.mkdir()
    audit_log = tmp_path / "audit.txt"
    (hook / "sitecustomize.py").write_text(AUDIT.format(log=str(audit_log)))
    env = {name: value for name, value in os.environ.items() if not name.startswith("WANDB_") and name != "NETRC"}
    env.update(HOME=str(home), LM_LIGHTNING_CACHE=str(corpus_cache), LM_LIGHTNING_DATA=str(SHARED_DATA),
               PYTHONPATH=os.pathsep.join([str(hook), env.get("PYTHONPATH", "")]), HYDRA_FULL_ERROR="0")
    command = [sys.executable, "-m", "lm_lightning", "train", "experiment=tiny", "trainer.max_steps=10",
               "sample.max_new_tokens=0", f"hydra.run.dir={tmp_path / 'run'}"]
    strace = shutil.which("strace")
    trace = tmp_path / "strace.txt"
    if strace:  # also sees the wandb-core and wandb-symon binaries, which Python's audit hook cannot
        command = [strace, "-f", "-qq", "-e", "trace=connect", "-o", str(trace), *command]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "the run should have gone to W&B offline"

    python_events = audit_log.read_text().splitlines() if audit_log.is_file() else []
    outside = [line for line in python_events if not _loopback_or_local(line.split(" ", 1)[1])]
    assert outside == [], f"Python looked up or connected outside loopback: {outside}"
    assert any("socket.connect" in line for line in python_events), "the audit hook saw nothing: is it installed?"

    if not strace:
        pytest.skip("strace is not installed: the W&B service binaries' connections were not checked "
                    "(apt-get install strace)")
    connects = [line for line in trace.read_text().splitlines() if "connect(" in line]
    assert connects, "strace recorded no connect at all"
    outside = [line for line in connects if "AF_UNIX" not in line and "127.0.0.1" not in line and '"::1"' not in line]
    assert outside == [], "connections outside loopback:\n" + "\n".join(outside)


def test_login_check_follows_wandb_host(tmp_path, monkeypatch):
    """A netrc entry for wandb's own configured host counts as a login; one for another host does not."""
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import urls

    from lm_lightning.tracking import wandb as tracking

    for name in [name for name in os.environ if name.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    netrc = tmp_path / ".netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HOME", str(tmp_path))
    wandb_setup.singleton().settings.api_key = None
    host = urls.DEFAULT_BASE_URL.split("://")[1]
    netrc.write_text("machine some.other.host\n  login user\n  password " + "a" * 40 + "\n")
    netrc.chmod(0o600)
    assert not tracking.wandb_credentials_present()
    assert tracking.resolve_mode("auto") == "offline"
    assert os.environ["WANDB_MODE"] == "offline"  # exported, so wandb's telemetry stays off too
    monkeypatch.delenv("WANDB_MODE")
    netrc.write_text(f"machine {host}\n  login user\n  password " + "a" * 40 + "\n")
    assert tracking.wandb_credentials_present()
    assert tracking.resolve_mode("auto") == "online"
    assert "WANDB_MODE" not in os.environ


def test_offline_mode_reaches_the_wandb_session_that_read_the_key(tmp_path, monkeypatch):
    """``auto`` without a key reads W&B's settings to look for one, then decides offline: the session W&B then
    uses is offline too (W&B ignores variables set after its session read them, and an online session builds
    its telemetry exporter for an offline run)."""
    from wandb.sdk import wandb_setup

    from lm_lightning.tracking import wandb as tracking

    for name in [name for name in os.environ if name.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    wandb_setup.teardown()
    assert wandb_setup.singleton().settings.mode == "online"  # W&B's default, read before the mode is known
    assert tracking.resolve_mode("auto") == "offline"
    assert wandb_setup.singleton().settings.mode == "offline"
    assert wandb_setup.singleton().settings._offline
