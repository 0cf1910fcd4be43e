"""Issue 7: DDP and FSDP2 on CPU match one process; sharded checkpoints resume across world sizes;
every strategy and precision option builds the right objects, or fails clearly without a GPU.
Strategy runs start their ranks as processes (slow); the single-process reference runs in this one."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from lm_lightning.errors import UserError
from lm_lightning.parallel import setup
from lm_lightning.parallel.setup import build_strategy, check_precision, micro_batch_size
from lm_lightning.config.app import CONF_DIR

from helpers import REPO, run_cli, run_in_process, step_losses
from helpers import TINY_SCALEOUT as TINY


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scaleout")

    def train(name: str, *args: str, in_process: bool = False) -> dict[int, float]:
        """A run in its own process (Lightning starts the other ranks as copies of it), or in this one."""
        run = run_in_process if in_process else run_cli
        run("train", *TINY, *args, f"hydra.run.dir={root / name}", cwd=root, cache=root / "cache")
        return step_losses(root / name)

    train.root = root
    return train


@pytest.fixture(scope="module")
def reference(runs):
    return runs("single", "trainer.max_steps=10", in_process=True)  # num_threads=1: the same arithmetic as a process


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_log_the_single_process_losses(runs, reference, strategy, request):
    if strategy == "ddp":  # the session's DDP run (conftest.py), which tests/test_multinode.py compares with too
        losses = step_losses(request.getfixturevalue("ddp_run"))
    else:
        losses = runs(strategy, f"strategy={strategy}", "trainer.devices=2", "trainer.max_steps=10")
    assert sorted(losses) == list(range(10))
    for step in range(10):
        assert abs(losses[step] - reference[step]) <= 1e-4, (step, losses[step], reference[step])


@pytest.mark.slow
def test_sharded_fsdp2_checkpoint_resumes_with_another_world_size(runs, reference):
    """One run stopped and resumed twice, 2 ranks -> 1 -> 2: each resume reads the shards the other world size
    wrote, and the step after each restart is the uninterrupted run's."""
    name, legs = "resume-2-1", [(2, 4), (1, 7), (2, 10)]  # (ranks, the step the leg stops at); checkpoints every 5
    last = runs.root / name / "checkpoints" / "last.ckpt"
    for leg, (world, end) in enumerate(legs):
        losses = runs(name, "strategy=fsdp2", f"trainer.devices={world}", f"trainer.max_steps={end}",
                      *(["ckpt_path=last"] if leg else []))
        assert (last / "meta.pt").is_file() and len(list(last.glob("*.distcp"))) == world  # one shard per rank
        # each save goes to a new folder renamed into place, the checkpoint it replaced kept whole beside it
        assert not last.with_name("last.ckpt.tmp").exists()
        assert leg == 0 or (last.with_name("last.ckpt.prev") / "meta.pt").is_file()
        if leg:
            restart = legs[leg - 1][1]  # the first step after the restart
            assert abs(losses[restart] - reference[restart]) <= 1e-5, (legs[leg - 1], world, losses[restart])


@pytest.mark.slow
def test_sharded_checkpoint_loads_in_the_single_process_path(runs):
    from lm_lightning.parallel.checkpoint import consolidate_checkpoint
    from lm_lightning.training.loading import load_trained

    folder = runs.root / "resume-2-1" / "checkpoints" / "last.ckpt"  # written by the resume test, when it ran
    if not folder.is_dir():
        runs("resume-2-1", "strategy=fsdp2", "trainer.devices=2", "trainer.max_steps=5")
    task, tokenizer = load_trained(str(folder))  # what evaluate and generate do
    full = consolidate_checkpoint(folder)
    for name, value in task.state_dict().items():
        assert torch.equal(value, full["state_dict"][name]), name
    optimizer = torch.optim.AdamW(task.model.parameters())
    state = full["optimizer_states"][0]
    assert sorted(state["state"]) == list(range(len(state["state"])))  # re-keyed to plain optimizer ids
    assert tokenizer.vocab_size == task.model.config.vocab_size and optimizer is not None


def test_global_batch_in_tokens_sets_the_micro_batch():
    assert micro_batch_size(524_288, 1024, world=8, accumulate=4) == 16
    assert micro_batch_size(256, 32, world=2, accumulate=1) == 4
    with pytest.raises(UserError, match="global_batch_tokens=1000 .* 64"):
        micro_batch_size(1000, 32, world=2, accumulate=1)


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=[*overrides, "paths.output_dir=/tmp/out"])


STRATEGIES = sorted(p.stem for p in (REPO / "lm_lightning" / "conf" / "strategy").glob("*.yaml"))
PRECISIONS = sorted(p.stem for p in (REPO / "lm_lightning" / "conf" / "precision").glob("*.yaml"))


def test_every_strategy_and_precision_option_is_covered_here():
    assert STRATEGIES == ["auto", "ddp", "deepspeed", "fsdp", "fsdp2"]
    assert PRECISIONS == ["bf16_mixed", "bf16_true", "fp16_mixed", "fp32"]


@pytest.mark.parametrize("option", ["auto", "ddp", "fsdp2"])
def test_cpu_strategies_build_a_trainer(option):
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

    strategy, parallelize = build_strategy(_compose(f"strategy={option}").strategy)
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False, enable_checkpointing=False)
    expected = {"auto": SingleDeviceStrategy, "ddp": DDPStrategy, "fsdp2": ModelParallelStrategy}[option]
    assert isinstance(trainer.strategy, expected)
    assert (parallelize is not None) == (option == "fsdp2")
    if option == "fsdp2":
        # which modules are blocks is the model's declaration (block_lists), not the strategy's
        assert parallelize.func.__name__ == "parallelize_fsdp2" and "blocks" not in parallelize.keywords


@pytest.mark.parametrize("option", ["fsdp", "deepspeed"])
def test_gpu_strategies_fail_clearly_without_a_gpu(monkeypatch, option):
    monkeypatch.setattr(setup, "gpu_available", lambda: False)
    with pytest.raises(UserError, match=f"strategy={option} needs CUDA GPUs"):
        build_strategy(_compose(f"strategy={option}").strategy)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fsdp_wraps_each_transformer_block(monkeypatch, checkpointing):
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import ShardingStrategy

    from lm_lightning.models.layers import Block

    monkeypatch.setattr(setup, "gpu_available", lambda: True)  # objects only: nothing runs on a GPU
    strategy, _ = build_strategy(_compose("strategy=fsdp", f"strategy.activation_checkpointing={checkpointing}").strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD and strategy._state_dict_type == "sharded"
    assert (strategy._activation_checkpointing_kwargs.get("check_fn") is not None
            or bool(strategy._activation_checkpointing_kwargs)) == checkpointing


def test_deepspeed_checks_its_stage_and_package(monkeypatch):
    import importlib.util

    monkeypatch.setattr(setup, "gpu_available", lambda: True)
    with pytest.raises(UserError, match="strategy.stage=4"):
        build_strategy(_compose("strategy=deepspeed", "strategy.stage=4").strategy)
    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(UserError, match="pip install deepspeed"):
            build_strategy(_compose("strategy=deepspeed").strategy)


@pytest.mark.parametrize("option", PRECISIONS)
def test_precision_options_build_on_cpu_or_fail_clearly(monkeypatch, option):
    import lightning as L

    monkeypatch.setattr(setup, "gpu_available", lambda: False)
    cfg = _compose(f"precision={option}")
    if option == "fp16_mixed":
        with pytest.raises(UserError, match="precision=16-mixed needs a CUDA GPU"):
            check_precision(cfg.precision, "auto")
        return
    check_precision(cfg.precision, "cpu")
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=cfg.trainer.precision, logger=False,
                        enable_checkpointing=False)
    assert trainer.precision == cfg.precision.trainer_precision


@pytest.mark.bad_input
def test_gpu_precision_on_cpu_is_a_one_line_cli_error(tmp_path):
    proc = run_in_process("train", "experiment=tiny", "logger=csv", "precision=fp16_mixed", "trainer.accelerator=cpu",
                          f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, cache=tmp_path / "cache", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: precision=16-mixed needs a CUDA GPU")
