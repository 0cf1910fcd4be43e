"""What a family can do is declared by its model class and read by models/capabilities.py: the table, the
grid and the commands' eligibility follow. A toy family defined only by a model module (tests/toy_family.py)
and a conf/model YAML in a separate config folder composes, trains with the objective its traits allow, is
refused for the others in one line, and joins the architecture × objective grid — no list edited."""

from __future__ import annotations

import math

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from helpers import REPO, run_in_process
from lm_lightning.config.app import CONF_DIR
from lm_lightning.config.checks import check_train_config
from lm_lightning.errors import IncompatiblePair, UserError
from lm_lightning.models import capabilities
from lm_lightning.models.capabilities import VALID_OBJECTIVES, families_where, grid, valid_pairs

TOY_MODEL = """\
_target_: toy_family.BagOfEmbeddingsLM.build  # tests/toy_family.py
family: bag                   # the family it declares
block_size: 32                # training window, tokens
n_embd: 16                    # embedding width
"""
# a few seconds of training on Tiny Shakespeare characters
SHORT = ["data=tinyshakespeare", "tokenizer=char", "data.corpus.source.max_bytes=20000", "data.batch_size=8",
         "data.val_batch_size=8", "trainer.max_steps=40", "trainer.val_check_interval=40", "trainer.limit_val_batches=2",
         "trainer.accelerator=cpu", "scheduler.warmup_steps=0", "optimizer.lr=0.01", "logger=csv",
         "sample.max_new_tokens=0", "trainer.enable_model_summary=false"]


@pytest.fixture
def toy_conf(tmp_path):
    """A config folder holding only conf/model/bag.yaml (joined to the package's through Hydra's search path)."""
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "bag.yaml").write_text(TOY_MODEL)
    return tmp_path / "conf"


def compose_train(conf, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=[f"hydra.searchpath=[file://{conf}]", "model=bag", *overrides],
                       return_hydra_config=True)


def test_a_family_declared_only_by_its_module_and_yaml_trains_with_its_objective(toy_conf, tmp_path):
    from lm_lightning.cli.train import train

    cfg = compose_train(toy_conf, *SHORT, f"paths.cache_dir={tmp_path / 'cache'}")
    with open_dict(cfg):  # what Hydra's run does before calling the command
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        HydraConfig.instance().set_config(cfg)
        del cfg["hydra"]
    try:
        record = train(cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert record["family"] == "bag" and record["objective"] == "causal_lm" and record["steps"] == 40
    assert record["parameters"]["non_embedding"] == 16 * 16 + 16  # the tanh layer; the tables are embedding
    assert math.isfinite(record["final"]["val/loss"]) and record["final"]["val/loss"] < record["initial_loss"] - 0.3
    assert record["final"]["val/bpb"] > 0  # causal LM: the predicted tokens are the text


def test_an_objective_the_toy_family_does_not_meet_is_refused_in_one_line(toy_conf):
    with pytest.raises(IncompatiblePair) as refused:
        check_train_config(compose_train(toy_conf, "objective=mlm"))
    assert str(refused.value) == "objective=mlm cannot train model family bag: valid objectives for bag are causal_lm"


def test_the_toy_config_dataclass_checks_its_options_when_composed(toy_conf):
    with pytest.raises(UserError, match=r"^model.n_embd=0 must be a positive integer$"):
        check_train_config(compose_train(toy_conf, "model.n_embd=0"))
    with pytest.raises(UserError, match="model.n_head is not an option of BagConfig"):
        check_train_config(compose_train(toy_conf, "+model.n_head=2"))


def test_fsdp2_refuses_a_family_that_declares_no_blocks(toy_conf):
    with pytest.raises(UserError, match="strategy=fsdp2 shards a model block by block and a bag model declares no blocks"):
        check_train_config(compose_train(toy_conf, "strategy=fsdp2"))


def test_fsdp2_shards_every_block_a_two_stack_model_declares(tmp_path):
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from lm_lightning.models.encoder_decoder import build_encoder_decoder
    from lm_lightning.parallel.fsdp2 import parallelize_fsdp2

    model = build_encoder_decoder(vocab_size=32, block_size=8, n_layer=2, n_decoder_layer=3, n_head=2, n_embd=16)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        parallelize_fsdp2(model, dist.init_device_mesh("cpu", (1,)))
        assert [type(block).__name__ for block in model.blocks()] == ["FSDPBlock"] * 5  # encoder's 2, decoder's 3
        assert all(isinstance(block, FSDPModule) for block in model.blocks())
        model(torch.randint(1, 32, (2, 8)), torch.randint(1, 32, (2, 6))).sum().backward()
    finally:
        dist.destroy_process_group()


def test_the_toy_family_joins_the_valid_pairs_and_the_grid(toy_conf):
    dirs = (str(toy_conf),)
    assert ("bag", "causal_lm") not in valid_pairs()
    assert sorted(valid_pairs(dirs)) == sorted([*valid_pairs(), ("bag", "causal_lm")])
    cells = [(objective, trains) for model, objective, trains in grid(dirs) if model == "bag"]
    assert cells == [(objective, objective == "causal_lm") for objective in capabilities.group_configs("objective")]
    assert len(grid(dirs)) == len(grid()) + len(cells)


def test_the_grid_sweep_runs_the_toy_family_and_counts_its_skipped_pairs(toy_conf, tmp_path):
    """The README's sweep (sweeps/arch_objective_grid.yaml) over NSP: every model config, the toy's included,
    is composed with mlm_nsp; BERT trains, every other family is skipped with its one-line refusal."""
    (toy_conf / "nsp_grid.yaml").write_text(
        "defaults:\n  - arch_objective_grid\n  - _self_\n"
        f"hydra:\n  searchpath: [file://{REPO / 'sweeps'}]\n  sweeper:\n    params:\n      objective: mlm_nsp\n")
    proc = run_in_process("train", "-m", "--config-dir", str(toy_conf), "--config-name", "nsp_grid", "trainer.max_steps=2",
                   "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "scheduler.warmup_steps=0",
                   "data.corpus.source.max_bytes=20000", "logger=csv", f"paths.log_dir={tmp_path / 'logs'}",
                   cwd=tmp_path, cache=tmp_path / "cache")
    cells = [trains for _, objective, trains in grid((str(toy_conf),)) if objective == "mlm_nsp"]
    trained, skipped = sum(cells), len(cells) - sum(cells)
    assert (trained, skipped) == (1, 12)  # bert; the 11 other families of the package and the toy
    assert f"sweep summary: {trained} of {trained} jobs finished, 0 failed; {skipped} incompatible pairs skipped" \
        in proc.stdout
    assert "error: objective=mlm_nsp cannot train model family bag: valid objectives for bag are causal_lm" \
        in proc.stderr.splitlines()


@pytest.mark.parametrize("family, objectives", [
    ("gpt", ("causal_lm",)), ("prefix_lm", ("causal_lm", "prefix_lm")), ("bert", ("mlm", "mlm_nsp")),
    ("t5", ("span_corruption", "bart_denoising", "ul2")), ("bart", ("span_corruption", "bart_denoising", "ul2")),
    ("lstm", ("causal_lm",)), ("bidirectional lstm", ("mlm",)), ("ffn", ("causal_lm",)),
])
def test_the_package_families_train_with_the_objectives_their_traits_meet(family, objectives):
    assert VALID_OBJECTIVES[family] == objectives


def test_the_commands_take_the_families_the_declarations_allow():
    from lm_lightning.adaptation.recipes import TASK_FAMILIES
    from lm_lightning.alignment.methods import FAMILIES as ALIGNABLE
    from lm_lightning.compression.quantize import SUPPORTED_FAMILIES

    assert set(TASK_FAMILIES["classification"]) == {"gpt", "prefix_lm", "bert"}  # those with features()
    assert set(TASK_FAMILIES["sft"]) == {"gpt", "prefix_lm", "rnn", "lstm", "gru", "ffn"}  # causal
    assert set(ALIGNABLE) == set(SUPPORTED_FAMILIES) == {"gpt", "prefix_lm"}  # causal with features / with blocks
    left_to_right_with_features = families_where(
        lambda cls, traits: capabilities.has_features(cls) and capabilities.reads_left_to_right(traits))
    assert left_to_right_with_features == ("gpt",)  # PPO and the transformers export: no bidirectional prefix
