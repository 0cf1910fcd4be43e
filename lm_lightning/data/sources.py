"""Where documents come from: local text, JSONL, Parquet, Hugging Face ``datasets`` (local
data files or a ``save_to_disk`` folder, read offline), or the Python standard library (the
offline default corpus, present wherever Python is).

Every source streams: documents are yielded one at a time in a fixed order, so the same
config always gives the same documents and a large corpus never sits in memory whole.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import os
import platform
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lm_lightning.data.hashing import file_sha256
from lm_lightning.errors import UserError

log = logging.getLogger(__name__)

KINDS = ("text", "jsonl", "parquet", "hf", "stdlib")

# Folders of the standard library that are test suites, not library code.
_STDLIB_SKIP_DIRS = {"site-packages", "test", "tests", "__pycache__"}
_STDLIB_SKIP_PATHS = {"idlelib/idle_test", "lib2to3/tests"}


def plain_config(cfg: Any) -> Any:
    """A config (dict or OmegaConf node) as plain JSON-able dicts, lists and scalars."""
    if isinstance(cfg, Mapping):
        return {str(k): plain_config(v) for k, v in cfg.items()}
    if isinstance(cfg, Sequence) and not isinstance(cfg, (str, bytes)):
        return [plain_config(v) for v in cfg]
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def iter_documents(source: Mapping) -> Iterator[str]:
    """Yield the documents of ``source`` (a ``data.source`` config) in a deterministic order.

    ``max_bytes`` (UTF-8 bytes, optional) cuts the stream to a fixed prefix: the last
    document is truncated so the total never exceeds it.
    """
    kind = _kind(source)
    readers = {"text": _text_records, "jsonl": _jsonl_records, "parquet": _parquet_records,
               "hf": _hf_records, "stdlib": _stdlib_records}
    split = _document_splitter(source.get("document_split") or "file")
    documents = (doc for record in readers[kind](source) for doc in split(record))
    yield from _take_bytes(documents, source.get("max_bytes"))


def describe_source(source: Mapping, digest: Callable[[Path], str] | None = None) -> dict:
    """A JSON-able fingerprint of ``source`` for cache keys: the config without its location, plus each local
    file's name (relative to the source folder), size and SHA-256 (``digest``: a memoised one, default reading the
    file), so an edited file changes the key while the same bytes copied elsewhere, or touched, keep it. An ``hf``
    folder counts every file in it (a dataset card can change its splits) and adds the ``_fingerprint`` that
    ``save_to_disk`` stored for each saved dataset."""
    kind = _kind(source)
    if kind == "stdlib":
        return {"config": plain_config(source), "python": platform.python_version(), "stdlib": str(_stdlib_root())}
    description: dict[str, Any] = {"config": {k: v for k, v in plain_config(source).items() if k != "path"}}
    digest = digest or file_sha256
    root = _local_path(source)
    files = _files(source, _SUFFIXES.get(kind))
    description["files"] = [{"name": f.name if f == root else f.relative_to(root).as_posix(), "size": f.stat().st_size,
                             "sha256": digest(f)} for f in files]
    if kind == "hf":
        description["dataset_fingerprints"] = [json.loads(f.read_text()).get("_fingerprint") for f in files
                                                if f.name == "state.json"]
    return description


# --- record readers: each yields the raw text of one file or record ---------------------

_SUFFIXES = {"text": (".txt",), "jsonl": (".jsonl", ".jsonl.gz"), "parquet": (".parquet",)}


def _kind(source: Mapping) -> str:
    kind = source.get("kind")
    if kind not in KINDS:
        raise UserError(f"unknown data.corpus.source.kind {kind!r}: choose one of {', '.join(KINDS)}")
    return kind


def _local_path(source: Mapping) -> Path:
    raw = source.get("path")
    if not raw:
        hint = ("; Hub datasets are not downloaded here: save one with datasets.load_dataset(...).save_to_disk(DIR) "
                "and set data.corpus.source.path=DIR") if source.get("kind") == "hf" else ""
        raise UserError(f"data.corpus.source.path is not set (kind={source.get('kind')}): point it at a file or folder{hint}")
    path = Path(os.path.expanduser(str(raw)))
    if not path.exists():
        raise UserError(f"data file not found: {path} (set data.corpus.source.path to an existing file or folder)")
    return path


def _files(source: Mapping, suffixes: tuple[str, ...] | None) -> list[Path]:
    """The file itself, or a folder's files ending in ``suffixes`` (None: all) in sorted
    relative-path order; hidden files and folders are left out."""
    path = _local_path(source)
    if path.is_file():
        return [path]
    files = [p for p in path.rglob("*") if p.is_file() and (suffixes is None or p.name.endswith(suffixes))
             and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    if not files:
        what = "/".join(suffixes) if suffixes else "data"
        raise UserError(f"no {what} files in folder {path} (check data.corpus.source.path and data.corpus.source.kind)")
    return sorted(files, key=lambda p: p.relative_to(path).as_posix())


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path} line {line} is not valid UTF-8 ({e.reason} at byte {e.start}): "
                        f"convert it or remove it from data.corpus.source.path") from None


def _text_records(source: Mapping) -> Iterator[str]:
    for path in _files(source, _SUFFIXES["text"]):
        yield _read_utf8(path)


def _jsonl_records(source: Mapping) -> Iterator[str]:
    """Records' ``text_field``. A line that is not UTF-8, not JSON or has no text field is an
    error naming the file and line, or with ``skip_bad_records: true`` a warning and skipped."""
    field = source.get("text_field") or "text"
    skip = bool(source.get("skip_bad_records", False))
    for path in _files(source, _SUFFIXES["jsonl"]):
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path} line {number} is not valid JSON ({e.msg})") from None
                    yield _field(record, field, f"{path} line {number}")
                except UnicodeDecodeError as e:
                    problem = f"{path} line {number} is not valid UTF-8 ({e.reason} at byte {e.start} of the line)"
                    if not skip:
                        raise UserError(f"{problem}: convert the file to UTF-8 or set ++data.corpus.source.skip_bad_records=true") from None
                    log.warning("skipped: %s", problem)
                except UserError as e:
                    if not skip:
                        raise UserError(f"{e}: fix or remove that line, or set ++data.corpus.source.skip_bad_records=true") from None
                    log.warning("skipped: %s", e)


def _parquet_records(source: Mapping) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError('data.corpus.source.kind=parquet needs pyarrow: pip install pyarrow (or "lm-lightning[parquet]")') from None
    field = source.get("text_field") or "text"
    for path in _files(source, _SUFFIXES["parquet"]):
        parquet = pq.ParquetFile(path)
        if field not in parquet.schema_arrow.names:
            raise UserError(f"{path} has no column {field!r} (columns: {parquet.schema_arrow.names}); set data.corpus.source.text_field")
        for batch in parquet.iter_batches(columns=[field], batch_size=1024):
            yield from (text for text in batch.column(0).to_pylist() if text)


def _hf_records(source: Mapping) -> Iterator[str]:
    """Records' ``text_field`` from a local dataset through ``datasets``: a ``save_to_disk``
    folder (``split`` picks from a saved DatasetDict), or data files (one file, or a folder
    that ``load_dataset`` reads, its splits named by file names or a dataset card). As in a
    Parquet column, a null (or missing) value is no document; a value that is not text is an error."""
    try:
        import datasets
    except ImportError:
        raise UserError('data.corpus.source.kind=hf needs the datasets package: pip install "lm-lightning[hf]"') from None
    path, field, split = _local_path(source), source.get("text_field") or "text", source.get("split") or "train"
    where = f"hf dataset {path} (split {split})"
    with _hf_offline(datasets):
        try:
            dataset = _hf_dataset(datasets, path, split)
            if dataset.column_names is not None and field not in dataset.column_names:
                raise UserError(f"{where} has no column {field!r} (columns: {dataset.column_names}); set data.corpus.source.text_field")
            for start, batch in enumerate(dataset.select_columns([field]).iter(batch_size=1024)):
                for index, text in enumerate(batch[field], start=start * 1024):
                    if text is not None and not isinstance(text, str):
                        raise UserError(f"{where} record {index}: {field!r} holds {type(text).__name__}, not text "
                                        "(set data.corpus.source.text_field to a text column)")
                    if text:
                        yield text
        except UserError:
            raise
        except (OSError, ValueError, KeyError) as e:  # what datasets and pyarrow raise on unreadable input
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"{where} could not be read by datasets: {first_line} "
                            "(check data.corpus.source.path and data.corpus.source.split)") from None


def _hf_dataset(datasets: Any, path: Path, split: str) -> Any:
    if (path / "dataset_dict.json").is_file():  # a saved DatasetDict: one saved Dataset folder per split
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        if split not in splits:
            raise UserError(f"hf dataset {path} has no split {split!r} (splits: {splits}); set data.corpus.source.split")
        path = path / split
    if (path / "state.json").is_file():
        if not json.loads((path / "state.json").read_text())["_data_files"]:  # datasets fails on these with an IndexError
            raise UserError(f"hf dataset {path} has no records: check data.corpus.source.path and data.corpus.source.split")
        return datasets.load_from_disk(str(path))
    if path.is_dir():
        return datasets.load_dataset(str(path), split=split, streaming=True)
    builder = next((b for suffixes, b in _HF_BUILDERS.items() if path.name.endswith(suffixes)), None)
    if builder is None:
        raise UserError(f"{path}: datasets reads {', '.join(s for x in _HF_BUILDERS for s in x)} files; "
                        "point data.corpus.source.path at one, at a folder of them, or at a save_to_disk folder")
    return datasets.load_dataset(builder, data_files=str(path), split=split, streaming=True)


_HF_BUILDERS = {(".parquet",): "parquet", (".jsonl", ".json", ".jsonl.gz", ".json.gz"): "json", (".csv",): "csv",
                (".txt",): "text", (".arrow",): "arrow"}


@contextlib.contextmanager
def _hf_offline(datasets: Any) -> Iterator[None]:
    """Local data only, so never wait on the network: ``datasets`` and ``huggingface_hub`` read their
    offline switches (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE) once at import, so set the module values."""
    import huggingface_hub.constants as hub

    before = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = before


def _field(record: Any, field: str, where: str) -> str:
    if not isinstance(record, Mapping) or not isinstance(record.get(field), str):
        raise UserError(f"{where} has no text field {field!r} (check data.corpus.source.text_field)")
    return record[field]


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_records(source: Mapping) -> Iterator[str]:
    """The interpreter's own ``.py`` library sources, test suites excluded."""
    root = _stdlib_root()
    paths = []
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root).as_posix()
        dirs[:] = [d for d in dirs if d not in _STDLIB_SKIP_DIRS and (Path(rel) / d).as_posix() not in _STDLIB_SKIP_PATHS]
        paths += [Path(folder, f).relative_to(root).as_posix() for f in files if f.endswith(".py")]
    for rel in sorted(paths):
        try:
            yield (root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few files are deliberately non-UTF-8; skipping keeps the corpus clean


# --- document splitting and the byte cap ------------------------------------------------

def _document_splitter(mode: str):
    """``file`` (one document per file/record), ``paragraph`` (split on blank lines) or
    ``lines:N`` (chunks of N lines, newlines kept, so the chunks join back to the file)."""
    if mode == "file":
        return lambda text: [text] if text else []
    if mode == "paragraph":
        return _paragraphs
    if mode.startswith("lines:") and mode[6:].isdigit() and int(mode[6:]) > 0:
        return lambda text, n=int(mode[6:]): _line_chunks(text, n)
    raise UserError(f"data.corpus.source.document_split={mode!r} is not valid: use file, paragraph or lines:<N> (e.g. lines:100)")


def _lines(text: str) -> Iterable[str]:
    return io.StringIO(text, newline="\n")  # split on "\n" only, keep line endings


def _paragraphs(text: str) -> Iterator[str]:
    block: list[str] = []
    for line in _lines(text):
        if line.strip():
            block.append(line)
        elif block:
            yield "".join(block).rstrip("\n")
            block = []
    if block:
        yield "".join(block).rstrip("\n")


def _line_chunks(text: str, n: int) -> Iterator[str]:
    chunk: list[str] = []
    for line in _lines(text):
        chunk.append(line)
        if len(chunk) == n:
            yield "".join(chunk)
            chunk = []
    if chunk:
        yield "".join(chunk)


def _take_bytes(documents: Iterable[str], max_bytes: int | None) -> Iterator[str]:
    if max_bytes is None:
        yield from documents
        return
    budget = int(max_bytes)
    for doc in documents:
        if budget <= 0:
            return
        size = len(doc.encode("utf-8"))
        if size > budget:  # cut inside this document; never split a UTF-8 character
            doc = doc.encode("utf-8")[:budget].decode("utf-8", errors="ignore")
            if doc:
                yield doc
            return
        budget -= size
        yield doc
