"""The local data of the lm-eval tasks shipped in ``conf/harness/tasks/`` (their ``custom_dataset`` and
``process_results``): built from files on disk, so the tasks run offline.

lm-eval calls a task's ``custom_dataset`` with the run's metadata as keyword arguments: ``data_dir`` (the
shared corpora, ``paths.data_dir``), and the file settings below, which ``lm-lightning evaluate harness``
takes as ``metadata.<key>=...`` and the ``lm_eval`` command as ``--metadata '{"<key>": ...}'``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lm_lightning.adaptation.classification import read_labelled_tsv
from lm_lightning.config.app import REPO_DIR
from lm_lightning.errors import UserError


def shared_data_dir(data_dir: str | Path | None = None) -> Path:
    """``data_dir``, else ``$LM_LIGHTNING_DATA``, else ``../shared/data`` beside the checkout (as ``paths.data_dir``)."""
    return Path(data_dir or os.environ.get("LM_LIGHTNING_DATA") or Path(REPO_DIR).parent / "shared" / "data")


def sst2(data_dir: str | None = None, sst2_file: str | None = None, **_metadata: Any):
    """SST-2 dev as ``lm-lightning score`` reads it (default: ``<data_dir>/sst2/dev.tsv``, 872 sentences), as the
    ``validation`` split: columns ``sentence`` (stripped) and ``label``."""
    import datasets

    path = Path(sst2_file) if sst2_file else shared_data_dir(data_dir) / "sst2" / "dev.tsv"
    texts, labels = read_labelled_tsv(path, "sentence", "label")
    return datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"sentence": texts, "label": labels})})


def wikitext2_raw(data_dir: str | None = None, wikitext_file: str | None = None, **_metadata: Any):
    """One document, ``test``: the whole text file as it is (default: WikiText-2's raw test set), the text
    ``lm-lightning evaluate as_trained=false`` scores."""
    import datasets

    path = Path(wikitext_file) if wikitext_file else shared_data_dir(data_dir) / "wikitext-2-raw" / "wiki.test.raw"
    if not path.is_file():
        raise UserError(f"text file not found: {path} (give metadata.wikitext_file=<a UTF-8 text file>)")
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": [path.read_text(encoding="utf-8")]})})


def perplexity_counts(doc: dict[str, str], results: list[float]) -> dict[str, tuple[float, int]]:
    """Per-word perplexity over whitespace-separated words (``len(text.split())``, as ``evaluate`` counts
    them; lm-eval's default also counts the empty ends of ``re.split``), per-byte over UTF-8 bytes."""
    (loglikelihood,) = results
    text = doc["text"]
    words, n_bytes = len(text.split()), len(text.encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, n_bytes),
            "bits_per_byte": (loglikelihood, n_bytes)}
