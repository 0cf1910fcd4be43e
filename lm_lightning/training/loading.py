"""Checkpoints a command reads: ``ckpt_path=last`` resolved in a run folder, and a trained model with its tokenizer."""

from __future__ import annotations

import pickle
from pathlib import Path

from lm_lightning.errors import UserError


def resolve_checkpoint(ckpt_path: str | None, checkpoint_dir: Path) -> str | None:
    """``last`` → ``<run>/checkpoints/last.ckpt`` of this run folder (error if missing); a path must exist."""
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        path = checkpoint_dir / "last.ckpt"
        if not path.exists():  # a file, or a folder of shards (strategy=fsdp2)
            raise UserError(
                f"ckpt_path=last but {path} does not exist: resume inside the earlier run's folder with "
                "hydra.run.dir=<that folder> ckpt_path=last, or pass ckpt_path=<file.ckpt>"
            )
        return str(path)
    if not Path(ckpt_path).exists():
        raise UserError(f"checkpoint not found: {ckpt_path} (pass ckpt_path=<an existing .ckpt file>)")
    return ckpt_path


def load_trained(ckpt_path: str, device: str = "cpu"):
    """A trained LanguageModelTask and its tokenizer, from one checkpoint file."""
    from lm_lightning.data.tokenizer import load_tokenizer
    from lm_lightning.tasks.language_model import LanguageModelTask
    from lm_lightning.training.checkpoint_io import refuse_unsafe, verify_checkpoint

    path = Path(ckpt_path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path} (pass ckpt_path=<an existing .ckpt file>)")
    if path.is_file() and path.suffix == ".pt":  # an int8 model written by lm-lightning quantize
        from lm_lightning.compression.quantize import load_int8

        return load_int8(path)
    if path.is_file():
        verify_checkpoint(path)  # its sidecar, or the SHA-256 sealed inside it, must match, as when training resumes
    try:
        from lm_lightning.parallel.checkpoint import as_file  # a sharded (fsdp2) folder is gathered in memory

        task = LanguageModelTask.load_from_checkpoint(as_file(path), map_location=device, weights_only=True)
    except UserError:
        raise
    except pickle.UnpicklingError as err:  # weights_only refused a global: the file would run code
        raise refuse_unsafe(path, err) from err
    except Exception as err:  # a truncated or foreign file fails in many ways inside torch.load
        raise UserError(f"checkpoint {path} could not be loaded ({type(err).__name__}: {err}); pass another ckpt_path") from err
    if task.tokenizer_model is None:
        raise UserError(f"checkpoint {path} carries no tokenizer: it was not written by lm-lightning train")
    tokenizer = load_tokenizer(task.tokenizer_model)  # a sentencepiece model or a tokenizer.json, by content
    task.eval()
    return task, tokenizer
