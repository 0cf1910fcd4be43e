"""No code runs from a checkpoint, and a damaged one is refused (issue 23, acceptance points 1 and 5).

Every command that reads a checkpoint loads it with ``weights_only=True``: a crafted file whose pickle
would create a file is refused with one ``error:`` line and exit status 2, and the file is not created.
A checkpoint carries its SHA-256 inside (the zip comment), so a flipped byte is refused without a sidecar.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import run_in_process

from lm_lightning.errors import UserError
from lm_lightning.training.checkpoint_io import load_checkpoint_file, verify_checkpoint


class _CreatesFile:
    """Unpickling this object calls ``open(marker, "w")``: the file appears only if the pickle runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _crafted(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": _CreatesFile(marker)}, path)
    return path


def _crafted_folder(folder: Path, marker: Path) -> Path:
    """A sharded (fsdp2) checkpoint folder whose ``meta.pt`` is the crafted pickle."""
    _crafted(folder / "meta.pt", marker)
    return folder


COMMANDS = {  # command line, with {ckpt} for the crafted file
    "evaluate": ["evaluate", "ckpt_path={ckpt}", "text_file={text}"],
    "generate": ["generate", "ckpt_path={ckpt}", "prompt=a"],
    "train_resume": ["train", "experiment=tiny", "trainer.max_steps=2", "scheduler.warmup_steps=1", "logger=csv", "ckpt_path={ckpt}"],
    "train_init_from": ["train", "experiment=tiny", "trainer.max_steps=2", "scheduler.warmup_steps=1", "logger=csv", "init_from={ckpt}"],
    "export": ["export", "ckpt_path={ckpt}", "out_dir=hf"],
    "align": ["align", "method=dpo", "ckpt_path={ckpt}"],
    "distill": ["distill", "teacher_ckpt={ckpt}"],
    "finetune": ["finetune", "ckpt_path={ckpt}"],
    "quantize": ["quantize", "ckpt_path={ckpt}"],
}


def _assert_refused(result, marker: Path, ckpt: Path) -> None:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert str(ckpt) in errors[0]
    # train's resume check (training/setup.py checkpoint_hparams) reads the file first, also with weights_only=True
    assert ("is not a plain lm-lightning checkpoint (it would run code when loaded)" in errors[0]
            or "is not a checkpoint this platform can read safely" in errors[0]), errors[0]
    assert not marker.exists()


@pytest.mark.bad_input
@pytest.mark.parametrize("command", COMMANDS)
def test_crafted_checkpoint_is_refused_before_it_runs(command, tmp_path, corpus_cache):
    marker = tmp_path / "pwned"
    ckpt = _crafted(tmp_path / "evil" / "last.ckpt", marker)
    (tmp_path / "text.txt").write_text("To be, or not to be.\n")
    args = [a.format(ckpt=ckpt, text=tmp_path / "text.txt") for a in COMMANDS[command]]
    _assert_refused(run_in_process(*args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, cache=corpus_cache,
                                   check=False), marker, ckpt)


@pytest.mark.bad_input
@pytest.mark.parametrize("kind", ["int8_pt", "sharded_folder"])
def test_crafted_int8_file_and_sharded_folder_are_refused(kind, tmp_path, corpus_cache):
    marker = tmp_path / "pwned"
    if kind == "int8_pt":  # evaluate reads a .pt as an int8 model written by quantize (load_int8)
        ckpt = _crafted(tmp_path / "evil" / "int8.pt", marker)
    else:
        ckpt = _crafted_folder(tmp_path / "evil" / "last.ckpt", marker)
    (tmp_path / "text.txt").write_text("To be, or not to be.\n")
    _assert_refused(run_in_process("evaluate", f"ckpt_path={ckpt}", f"text_file={tmp_path / 'text.txt'}",
                                   f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, cache=corpus_cache, check=False),
                    marker, ckpt)


def test_real_checkpoint_loads_with_weights_only(tiny_checkpoint):
    """What train writes (RNG states, hyper-parameters, callbacks, loops) is plain tensors and containers."""
    checkpoint = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 30
    assert isinstance(checkpoint["rng_states"]["numpy"][1], torch.Tensor)
    assert checkpoint["rng_states"]["numpy"][1].numel() == 624  # MT19937's key


@pytest.mark.bad_input
@pytest.mark.parametrize("where", ["start", "pickle", "tensor_data", "end"])
def test_flipped_byte_without_sidecar_is_refused(where, tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "last.ckpt"
    shutil.copyfile(tiny_checkpoint, ckpt)  # no sidecar copied: the SHA-256 inside the file is what checks it
    verify_checkpoint(ckpt)
    load_checkpoint_file(ckpt)
    data = bytearray(ckpt.read_bytes())
    offset = {"start": 0, "pickle": data.find(b"data.pkl") + 40, "tensor_data": len(data) // 2, "end": len(data) - 1}[where]
    data[offset] ^= 0x01
    ckpt.write_bytes(bytes(data))
    with pytest.raises(UserError, match=rf"^checkpoint {ckpt} .*(SHA-256|damaged)"):
        load_checkpoint_file(ckpt)


@pytest.mark.bad_input
def test_flipped_byte_is_refused_by_the_commands(tiny_checkpoint, tmp_path, corpus_cache):
    ckpt = tmp_path / "copy.ckpt"
    data = bytearray(tiny_checkpoint.read_bytes())
    data[len(data) // 2] ^= 0x10
    ckpt.write_bytes(bytes(data))
    (tmp_path / "text.txt").write_text("To be, or not to be.\n")
    result = run_in_process("evaluate", f"ckpt_path={ckpt}", f"text_file={tmp_path / 'text.txt'}", f"hydra.run.dir={tmp_path / 'run'}",
                            cwd=tmp_path, cache=corpus_cache, check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert "fails its built-in SHA-256 check" in errors[0]
