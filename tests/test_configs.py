"""Every config file composes, and every option in it says what it means."""

from __future__ import annotations

import re

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lm_lightning.config.app import CONF_DIR, REPO_DIR

from helpers import REPO, command_of_experiment

YAMLS = sorted(p for p in (REPO / "lm_lightning" / "conf").rglob("*.yaml")) + sorted((REPO / "sweeps").rglob("*.yaml"))


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_option_carries_a_comment(path):
    missing = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#") or text.startswith("- ") or re.fullmatch(r"[\w./+-]+:", text):
            continue  # blank, comment, defaults-list entry, or a parent node
        if "#" not in line:
            missing.append(f"{path.name}:{number}: {text}")
    assert not missing, "options without a comment:\n" + "\n".join(missing)


GROUPS = {p.parent.name: sorted(q.stem for q in p.parent.glob("*.yaml")) for p in (REPO / "lm_lightning" / "conf").glob("*/*.yaml")}
COMMAND_GROUPS = {"task": "finetune", "peft": "finetune"}  # groups only fine-tuning composes


def command_of(group: str, option: str) -> str:
    """The command whose config composes this option: an experiment names it in its usage line;
    other groups belong to train unless listed."""
    return command_of_experiment(option) if group == "experiment" else COMMAND_GROUPS.get(group, "train")


@pytest.mark.parametrize("group, option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes_into_its_command(group, option):
    command = command_of(group, option)
    overrides = [f"{group}={option}", "paths.output_dir=/tmp/out"] + (["ckpt_path=x.ckpt"] if command != "train" else [])
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=command, overrides=overrides)
    if group == "experiment":  # experiments are global overlays, not a node
        assert cfg.experiment_name == option
    elif group in ("hparams_search", "debug"):  # global overlays of trainer, sweeper and path settings
        assert cfg.get(group, None) is None and cfg.command == command
    else:
        assert cfg[group] is not None
    # everything but run-time values (Hydra's output folder, the tracker's run name) resolves
    for key in ("data", "tokenizer", "model", "optimizer", "scheduler", "trainer", "task", "peft"):
        if key in cfg:
            OmegaConf.to_container(cfg[key], resolve=True)


def test_repo_dir_is_the_source_checkout_holding_the_package():
    assert REPO_DIR == str(REPO)
