"""Issue 19: benchmarks/gpu_check.sh's CPU-safe path (arguments, every config it would run composed, one
no-GPU line, exit 0, nothing trained), synthetic tokens, and the settings only a CUDA device takes."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

from lm_lightning.data.synthetic import SyntheticDataModule
from lm_lightning.parallel.cuda import optimizer_kwargs_for, pin_memory_for, use_tf32_on_cuda
from lm_lightning.training.muon import MuonAdamW

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

RUNS = ["bf16-mixed", "fsdp", "fsdp2", "fp16-mixed", "bf16-true", "resume"]


def test_without_a_gpu_it_composes_every_run_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "no GPU: CUDA is not available here; composed 6 configs, trained nothing"
    composed = [line for line in lines if line.startswith("composed ")]
    assert [line.split(":")[0].removeprefix("composed ") for line in composed] == RUNS
    by_name = {line.split(":")[0].removeprefix("composed "): line for line in composed}
    for name in RUNS:  # GPT-2 124M on synthetic tokens, one GPU
        assert all(o in by_name[name] for o in ("model.n_layer=12 ", "model.n_embd=768 ", "model.block_size=1024 ",
                                                "data=synthetic ", "data.corpus.vocab_size=50304 ", "trainer.devices=1 "))
    assert "strategy=fsdp " in by_name["fsdp"] and "strategy=fsdp2 " in by_name["fsdp2"]
    assert "precision=fp16_mixed " in by_name["fp16-mixed"] and "precision=bf16_true " in by_name["bf16-true"]
    assert all("compile=true " in by_name[n] and "trainer.max_steps=20 " in by_name[n] for n in RUNS[:-1])
    assert "trainer.max_steps=10 " in by_name["resume"]
    # the estimate beside each run: 124M parameters in bf16-mixed + AdamW = 1.99 GB before 10.13 GB of activations
    assert "estimate 12.12 GB per device" in lines[lines.index(by_name["bf16-mixed"]) + 1]
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_print_config_shows_the_composed_job(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path), "--only", "fsdp2", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "_target_: lm_lightning.data.synthetic.SyntheticDataModule" in out
    assert "_target_: gpu_check.StepStats" in out and "trainer_precision: bf16-mixed" in out


@pytest.mark.parametrize("argv, message", [(["--steps", "5"], "--steps=5 must exceed --warmup=5"),
                                           (["--only", "ddp"], "--only ddp: choose from bf16-mixed")])
def test_bad_arguments_stop_before_composing(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        gpu_check.main(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow  # its own interpreter: 6-12 s on this 2-core machine, beside the in-process test above
def test_the_shell_script_runs_its_cpu_path(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--out", str(tmp_path / "out"),
                           "--only", "resume"], capture_output=True, text=True, timeout=120, check=False,
                          env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "no GPU: CUDA is not available here; composed 1 configs, trained nothing"


def test_fused_adamw_on_cuda_and_cpu():
    adamw = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1)
    assert optimizer_kwargs_for(adamw, torch.device("cuda", 0)) == {"fused": True}
    assert optimizer_kwargs_for(functools.partial(torch.optim.Adam), torch.device("cuda")) == {"fused": True}
    assert optimizer_kwargs_for(adamw, torch.device("cpu")) == {"fused": True}
    assert optimizer_kwargs_for(adamw, torch.device("meta")) == {}
    assert optimizer_kwargs_for(functools.partial(MuonAdamW, lr=1e-3), torch.device("cpu")) == {"fused": True}
    assert optimizer_kwargs_for(functools.partial(torch.optim.SGD, lr=0.1), torch.device("cuda")) == {}
    # a configured implementation is kept
    assert optimizer_kwargs_for(functools.partial(torch.optim.AdamW, foreach=True), torch.device("cuda")) == {}
    assert optimizer_kwargs_for(functools.partial(torch.optim.AdamW, fused=False), torch.device("cuda")) == {}


def test_tf32_only_on_cuda():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    assert not use_tf32_on_cuda(torch.device("cpu"))
    assert torch.get_float32_matmul_precision() == "highest"
    try:
        assert use_tf32_on_cuda(torch.device("cuda", 0))  # sets flags only: nothing runs on a GPU
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before)
        torch.backends.cudnn.allow_tf32 = True  # torch's default


def synthetic(vocab_size: int = 300, **changes) -> SyntheticDataModule:
    corpus = {"name": "synthetic", "vocab_size": vocab_size, "train_tokens": 4096, "val_tokens": 512} | changes
    return SyntheticDataModule(corpus=corpus, tokenizer={}, cache_dir="/nonexistent", block_size=16, batch_size=4,
                               sampling="random", seed=3)


def test_loaders_pin_memory_only_for_a_cuda_accelerator():
    assert pin_memory_for(CUDAAccelerator()) and not pin_memory_for(CPUAccelerator())
    data = synthetic()
    data.trainer = SimpleNamespace(accelerator=CUDAAccelerator(), global_rank=0, world_size=1)
    assert data.train_dataloader().pin_memory and data.val_dataloader().pin_memory
    data.trainer = SimpleNamespace(accelerator=CPUAccelerator(), global_rank=0, world_size=1)
    assert not data.train_dataloader().pin_memory


def test_synthetic_tokens_are_fixed_random_windows_of_the_vocabulary(tmp_path):
    data = synthetic(vocab_size=70000)
    train, val = data.corpus.tokens("train"), data.corpus.tokens("val")
    assert train.shape == (4096,) and val.shape == (512,) and train.dtype == np.uint32  # above 65,536 ids
    assert train.max() < 70000 and len(np.unique(train)) > 3500  # uniform over a large vocabulary
    assert np.array_equal(train, synthetic(vocab_size=70000).corpus.tokens("train"))  # the same for every rank
    assert not np.array_equal(train[:512], val)
    assert data.corpus.tokenizer().vocab_size == 70000 and data.bytes_per_token("val") == 1.0
    batch = next(iter(data.train_dataloader()))
    assert batch.shape == (4, 17) and batch.dtype == torch.int64
    assert synthetic().corpus.tokens("train").dtype == np.uint16
    data.cache_dir = tmp_path
    data._corpus = None
    assert "no tokenizer" in data.corpus.tokenizer_path.read_text()  # what a checkpoint carries instead


def test_the_task_builds_its_optimizer_with_the_device_decision(monkeypatch):
    from lm_lightning.tasks import language_model
    from lm_lightning.tasks.language_model import LanguageModelTask

    model = {"_target_": "lm_lightning.models.gpt.build_gpt", "vocab_size": 32, "block_size": 8, "n_layer": 1,
             "n_head": 2, "n_embd": 16}
    task = LanguageModelTask(model=model, objective={"_target_": "lm_lightning.objectives.causal_lm.CausalLM"},
                             optimizer=functools.partial(torch.optim.AdamW, lr=1e-3), scheduler=None)
    assert task.configure_optimizers().defaults["fused"] is True  # torch's fused kernel on CPU too
    asked = []
    monkeypatch.setattr(language_model, "optimizer_kwargs_for",
                        lambda factory, device: asked.append(device.type) or {})  # as on a device without one
    assert not task.configure_optimizers().defaults.get("fused") and asked == ["cpu"]
