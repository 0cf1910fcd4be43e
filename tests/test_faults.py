"""Faults that used to end in a traceback or bad advice: a damaged corpus-cache entry is rebuilt, a killed
prepare's build folder is removed on the next prepare (a live one is kept), a sweep launcher that cannot
start here and W&B online without a key each end in one ``error:`` line with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import SHARED_DATA, cache_entries, run_in_process

from lm_lightning.data.corpus import prepare_corpus
from lm_lightning.data.corpus_staging import write_owner
from lm_lightning.errors import UserError
from lm_lightning.tracking.wandb import resolve_mode

DATA = {"name": "faults", "source": {"kind": "text", "path": str(SHARED_DATA / "tinyshakespeare" / "input.txt"),
                                     "document_split": "paragraph", "max_bytes": 30_000},
        "split": {"val_fraction": 0.1, "seed": 0}}
TOKENIZER = {"type": "char", "verbose": False}

pytestmark = pytest.mark.bad_input  # every test here: a user's mistake ends in one error line


def _damage_tokenizer(entry):
    path = entry / json.loads((entry / "metadata.json").read_text())["tokenizer"]["file"]
    path.write_bytes(path.read_bytes()[:10])  # cut short


def _damage_metadata(entry):
    (entry / "metadata.json").write_text('{"tokenizer": ')


@pytest.mark.parametrize("damage", [_damage_tokenizer, _damage_metadata], ids=["truncated tokenizer", "invalid metadata.json"])
def test_damaged_cache_entry_is_rebuilt(tmp_path, damage, caplog):
    first = prepare_corpus(DATA, TOKENIZER, tmp_path)
    expected = first.tokens("train").tolist()
    damage(first.directory)
    again = prepare_corpus(DATA, TOKENIZER, tmp_path)
    assert again.directory == first.directory
    assert again.tokens("train").tolist() == expected and again.tokenizer().vocab_size == first.tokenizer().vocab_size
    assert "is damaged" in caplog.text
    assert cache_entries(tmp_path) == [first.directory.name]  # the damaged copy is gone


def test_damaged_entry_loaded_directly_is_one_line(tmp_path):
    from lm_lightning.data.corpus import open_prepared

    entry = prepare_corpus(DATA, TOKENIZER, tmp_path).directory
    _damage_tokenizer(entry)
    with pytest.raises(UserError, match=f"rm -rf {entry}"):
        open_prepared(entry)


def test_dead_build_folders_removed_live_ones_kept(tmp_path):
    dead_proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(dead_proc.stdout)
    dead = tmp_path / f".tmp-faults-abc-{dead_pid}-0000"
    live = tmp_path / f".tmp-faults-abc-{os.getpid()}-1111"
    unknown = tmp_path / ".tmp-faults-abc-1-2222"  # no owner file: left alone
    for folder in (dead, live, unknown):
        folder.mkdir()
    write_owner(live)
    (dead / "owner.json").write_text(json.dumps({"host": json.loads((live / "owner.json").read_text())["host"], "pid": dead_pid}))
    entry = prepare_corpus(DATA, TOKENIZER, tmp_path).directory
    assert not dead.exists() and live.exists() and unknown.exists()
    assert not (entry / "owner.json").exists()


def test_slurm_launcher_without_slurm(tmp_path, corpus_cache, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    proc = run_in_process("train", "-m", "hydra/launcher=slurm", "experiment=tiny", cwd=tmp_path, cache=corpus_cache, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "sbatch is not on PATH" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and not any(tmp_path.iterdir())


def test_missing_launcher_plugin(tmp_path, corpus_cache, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "hydra_plugins.hydra_joblib_launcher" else real(name, *a))
    proc = run_in_process("train", "-m", "hydra/launcher=parallel", "experiment=tiny", cwd=tmp_path, cache=corpus_cache, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ('error: hydra/launcher=parallel needs its Hydra plugin, which is not installed: '
                                   'pip install -e ".[launchers]"')


def test_wandb_online_without_key(monkeypatch, tmp_path):
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("lm_lightning.tracking.wandb.wandb_credentials_present", lambda: False)
    with pytest.raises(UserError, match="wandb login.*logger.wandb.mode=offline"):
        resolve_mode("online")
    assert resolve_mode("auto") == "offline"
