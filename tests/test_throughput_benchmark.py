"""benchmarks/throughput.py (issue 19, the README's "Throughput" command): its three paths do the same training, and
the command prints a row per path and the two ratios."""

from __future__ import annotations

import re
import subprocess
import sys

import torch

from helpers import REPO, cli_env

sys.path.insert(0, str(REPO / "benchmarks"))
import throughput  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)


def test_bare_lightning_trains_exactly_as_the_plain_loop(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything the bare Trainer writes
    models = []
    parts = throughput.plain_parts

    def kept(*args):
        made = parts(*args)
        models.append(made[0])
        return made

    monkeypatch.setattr(throughput, "plain_parts", kept)
    shape = throughput.SHAPES["nanogpt"]
    data = throughput.batches(shape, 3)
    for path in (throughput.plain_loop, throughput.bare_lightning):
        assert len(path(shape, data, "cpu", "32-true", False)) == 3  # a step time per batch
    plain, bare = (model.state_dict() for model in models)
    torch.manual_seed(0)  # the initial weights both started from (plain_parts seeds 0)
    initial = throughput.GPT(throughput.GPTConfig(**throughput.model_config(shape))).state_dict()
    assert not torch.equal(plain["lm_head.weight"], initial["lm_head.weight"])  # three updates happened
    for name, value in plain.items():
        torch.testing.assert_close(bare[name], value, rtol=0, atol=0, msg=name)


def test_the_command_prints_each_path_and_the_ratios(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks/throughput.py"), "--shapes", "nanogpt", "--steps", "3",
                          "--warmup", "1", "--runs", "1"], cwd=tmp_path, env=cli_env(tmp_path / "cache"),
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = re.findall(r"^  (plain PyTorch|bare Lightning|Trainer) +median step +([0-9.]+) ms", out, re.M)
    assert [path for path, _ in rows] == ["plain PyTorch", "bare Lightning", "Trainer"]
    assert all(float(ms) > 0 for _, ms in rows)
    ratios = re.findall(r"^  (bare Lightning|Trainer) / plain tokens/s = ([0-9.]+)", out, re.M)
    assert [path for path, _ in ratios] == ["bare Lightning", "Trainer"] and all(float(r) > 0 for _, r in ratios)
    assert "; target >= 0.98" in out.splitlines()[-1]
