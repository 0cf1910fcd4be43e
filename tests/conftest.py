"""Fixtures the whole suite shares: one thread per test process, and artefacts built once per test session
(a prepared corpus, a tiny trained run) that many tests read instead of each building its own.

Under pytest-xdist each worker is its own process with its own session fixtures: a session artefact is
built by whichever worker asks first, under a file lock in the folder the workers share, and reused by
the others. Tests read these artefacts and never write into them (copy first: ``shutil.copytree``)."""

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from filelock import FileLock

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

from helpers import TINY_SCALEOUT, run_cli, run_command  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are fastest on one thread; several fight each other on a busy CPU (100x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    """The folder of this test session's shared artefacts: under xdist the workers' common parent folder
    (each worker's base temp folder is its own), else this process's base temp folder."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "session"


def built_once(folder: Path, build: Callable[[Path], object]) -> Path:
    """``folder``, made by ``build(folder)`` once per test session whichever worker comes first; the others
    wait on the lock. A build that failed half-way is started afresh by the next one to ask."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    done = folder.with_name(folder.name + ".done")
    with FileLock(str(folder.with_name(folder.name + ".lock"))):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            previous = torch.get_num_threads()
            torch.set_num_threads(1)  # session fixtures are set up before the module's one_thread
            try:
                build(folder)
            finally:
                torch.set_num_threads(previous)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def corpus_cache(session_dir) -> Path:
    """A corpus cache holding Tiny Shakespeare in characters (what ``experiment=tiny`` and the other Tiny
    Shakespeare experiments train on), prepared once: ``lm-lightning prepare data=tinyshakespeare tokenizer=char``."""
    return built_once(session_dir / "cache", lambda cache: run_command(
        "prepare", "data=tinyshakespeare", "tokenizer=char", "wandb_mode=disabled",
        run_dir=session_dir / "prepare", cache=cache))


@pytest.fixture(scope="session")
def ddp_run(session_dir, corpus_cache) -> Path:
    """``experiment=tiny`` trained by two DDP processes (Lightning starts the second rank) for 10 steps
    (``helpers.TINY_SCALEOUT``): the reference of the multi-process tests, trained once a session."""
    return built_once(session_dir / "ddp_run", lambda run: run_cli(
        "train", *TINY_SCALEOUT, "strategy=ddp", "trainer.devices=2", "trainer.max_steps=10", f"hydra.run.dir={run}",
        cwd=session_dir, cache=corpus_cache))


@pytest.fixture(scope="session")
def tiny_run(session_dir, corpus_cache) -> Path:
    """One tiny tracked run folder, trained once: ``experiment=tiny`` for 30 steps (a 2 x 32 GPT, context 32,
    on Tiny Shakespeare characters), CSV log, no sample. Its checkpoints are what evaluate, generate,
    score, finetune, align (PPO), distill, quantize, export and continued pretraining start from."""
    return built_once(session_dir / "tiny_run", lambda run: run_command(
        "train", "experiment=tiny", "trainer.max_steps=30", "sample.max_new_tokens=0", "logger=csv",
        run_dir=run, cache=corpus_cache))


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_run) -> Path:
    """The tiny run's ``last.ckpt`` (with its ``.sha256`` sidecar): the session's pre-trained GPT."""
    return tiny_run / "checkpoints" / "last.ckpt"
