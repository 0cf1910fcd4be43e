"""Sharded (FSDP2) checkpoints → one ordinary Lightning checkpoint file.

A run with ``strategy=fsdp2`` writes each checkpoint as a folder (``last.ckpt/``): one shard file
per rank plus ``meta.pt`` (step, loops, schedulers, hyper-parameters, tokenizer). Another FSDP2 run
resumes from that folder with any number of processes. Everything else (``strategy=auto``/``ddp``
resume, ``lm-lightning evaluate``/``generate``) takes a single file; this module gathers the shards:

    python -m lm_lightning.parallel.checkpoint outputs/.../checkpoints/last.ckpt last-full.ckpt

``evaluate`` and ``generate`` do this in memory when given a folder.
"""

from __future__ import annotations

import argparse
import io
import re
from itertools import chain
from pathlib import Path
from typing import Any

import torch

from lm_lightning.errors import UserError

METADATA = "meta.pt"  # Lightning's name for the non-tensor part of a distributed checkpoint


def is_sharded(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / METADATA).is_file()


def consolidate_checkpoint(folder: str | Path) -> dict[str, Any]:
    """The full checkpoint of a sharded folder, in the layout ``Trainer.fit(ckpt_path=...)`` reads.

    Optimizer states are re-keyed from parameter names to the integer ids a plain optimizer uses
    (parameters numbered in parameter-group order, as ``torch.optim.Optimizer.state_dict`` does).
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    folder = Path(folder)
    if not is_sharded(folder):
        raise UserError(f"{folder} is not a sharded checkpoint folder (no {METADATA} inside)")
    from lm_lightning.training.checkpoint_io import load_checkpoint_file

    checkpoint = load_checkpoint_file(folder / METADATA, name=folder)  # before the shards: refused before anything runs
    shards: dict[str, Any] = {}  # every rank's shards, gathered into full tensors in this one process
    _load_state_dict(shards, storage_reader=FileSystemReader(folder), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    checkpoint["state_dict"] = shards.pop("state_dict")
    names = sorted((k for k in shards if re.fullmatch(r"optimizer_\d+", k)), key=lambda k: int(k.split("_")[1]))
    checkpoint["optimizer_states"] = [_by_index(shards[k]) for k in names]
    return checkpoint


def _by_index(optimizer_state: dict[str, Any]) -> dict[str, Any]:
    groups = optimizer_state["param_groups"]
    index = {name: i for i, name in enumerate(chain.from_iterable(g["params"] for g in groups))}
    return {
        "state": {index[name]: value for name, value in optimizer_state["state"].items()},
        "param_groups": [{**g, "params": [index[name] for name in g["params"]]} for g in groups],
    }


def as_file(path: str | Path) -> str | io.BytesIO:
    """``path`` itself when it is a file; a sharded folder gathered into an in-memory checkpoint file."""
    if not Path(path).is_dir():
        return str(path)
    buffer = io.BytesIO()
    torch.save(consolidate_checkpoint(path), buffer)
    buffer.seek(0)
    return buffer


def main() -> None:
    parser = argparse.ArgumentParser(description="gather a sharded (FSDP2) checkpoint folder into one file")
    parser.add_argument("folder", help="the sharded checkpoint folder, e.g. <run>/checkpoints/last.ckpt")
    parser.add_argument("output", help="the single-file checkpoint to write")
    args = parser.parse_args()
    from lm_lightning.training.checkpoint_io import save_checkpoint_file

    save_checkpoint_file(consolidate_checkpoint(args.folder), args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
