"""The report of one corpus preparation: what went in, what each filter and dedup removed,
what came out per split, how well the tokenizer compresses, and how long each stage took.

``build_report`` makes it (a JSON-able dict, saved as ``report.json`` in the cache entry),
``format_report`` prints it, ``log_report`` records it as a W&B run (job_type ``prepare``).
"""

from __future__ import annotations

import os
from typing import Any

REPORT_FILE = "report.json"


def build_report(meta: dict, seconds: dict[str, float], num_proc: int) -> dict:
    """``meta``: the corpus metadata (``cleaning_stats``, ``dedup_stats``, ``splits``, ``tokenizer``)."""
    clean, dedup, splits = meta["cleaning_stats"], meta.get("dedup_stats", {}), meta["splits"]
    filters = {k[len("removed_"):]: {"documents": v, "bytes": clean.get(f"{k}_bytes", 0)}
               for k, v in sorted(clean.items()) if k.startswith("removed_") and not k.endswith("_bytes")}
    tokens = sum(s["tokens"] - s["documents"] for s in splits.values())  # without the EOS separators
    nbytes = sum(s["bytes"] for s in splits.values())
    words = sum(s.get("words", 0) for s in splits.values())
    held_out = splits.get("val") or splits["train"]  # coverage on text the tokenizer did not train on, when there is some
    return {
        "corpus": meta["key"][:12],
        "source": meta["source"]["config"],
        "input": {"documents": clean.get("documents_in", 0), "bytes": clean.get("bytes_in", 0)},
        "cleaning": {"removed": filters, "masked": {k[len("masked_"):]: v for k, v in sorted(clean.items()) if k.startswith("masked_")},
                     "boilerplate_lines": clean.get("boilerplate_lines", 0),
                     "documents_out": clean.get("documents_out", 0), "bytes_out": clean.get("bytes_out", 0)},
        "dedup": dedup,
        "splits": {name: {k: s[k] for k in ("documents", "bytes", "tokens", "words", "fallback_tokens") if k in s} for name, s in splits.items()},
        "tokenizer": {"type": meta["tokenizer"]["type"], "vocab_size": meta["tokenizer"]["vocab_size"],
                      "tokens_per_byte": tokens / nbytes if nbytes else 0.0,
                      "tokens_per_word": tokens / words if words else 0.0,
                      "coverage": 1 - held_out.get("fallback_tokens", 0) / max(held_out["tokens"] - held_out["documents"], 1),
                      "training_seconds": round(seconds.get("tokenizer_training", 0.0), 2)},
        "seconds": {**{k: round(v, 2) for k, v in seconds.items()}, "total": round(sum(seconds.values()), 2)},
        "num_proc": num_proc,
    }


def format_report(report: dict) -> str:
    """The report as aligned text lines."""
    lines = [f"corpus report ({report['corpus']})",
             f"  input            {report['input']['documents']:>10,} documents {report['input']['bytes']:>14,} bytes"]
    for name, r in report["cleaning"]["removed"].items():
        if r["documents"]:
            lines.append(f"  - {name:<15}{r['documents']:>10,} documents {r['bytes']:>14,} bytes removed")
    for name, n in report["cleaning"]["masked"].items():
        lines.append(f"  masked {name:<12}{n:>10,} spans")
    if report["cleaning"]["boilerplate_lines"]:
        lines.append(f"  boilerplate      {report['cleaning']['boilerplate_lines']:>10,} lines cut")
    d = report["dedup"]
    if "exact_removed" in d:
        lines.append(f"  - exact dups     {d['exact_removed']:>10,} documents {d['exact_removed_bytes']:>14,} bytes removed "
                     f"({d['exact_clusters']:,} clusters)")
    if "near_removed" in d:
        lines.append(f"  - near dups      {d['near_removed']:>10,} documents {d['near_removed_bytes']:>14,} bytes removed "
                     f"({d['near_clusters']:,} clusters; LSH {d['near_bands']}x{d['near_rows']}, "
                     f"{d['near_candidate_pairs']:,} candidate pairs, {d['near_verified_pairs']:,} verified)")
    for name, s in report["splits"].items():
        lines.append(f"  {name:<16} {s['documents']:>10,} documents {s['bytes']:>14,} bytes {s['tokens']:>12,} tokens")
    t = report["tokenizer"]
    lines.append(f"  tokenizer        {t['type']} {t['vocab_size']:,}: {t['tokens_per_byte']:.4f} tokens/byte, "
                 f"{t['tokens_per_word']:.3f} tokens/word, {t['coverage']:.2%} of held-out tokens in the vocabulary, "
                 f"trained in {t['training_seconds']:.1f} s")
    lines.append("  seconds          " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items())
                 + f" (num_proc {report['num_proc']})")
    return "\n".join(lines)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
    return out


def log_report(report: dict, mode: str, save_dir: str, project: str = "lm-lightning", group: str | None = None) -> str | None:
    """Record the report as a W&B run (job_type ``prepare``): the report as its summary and
    a table of row ``(section, name, documents, bytes, tokens)``. Returns the run folder, or
    None when ``mode`` is ``disabled``. Never prompts: ``auto`` is offline without credentials."""
    from lm_lightning.tracking.wandb import resolve_mode

    mode = resolve_mode(mode)
    if mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    os.makedirs(save_dir, exist_ok=True)
    run = wandb.init(project=project, job_type="prepare", mode=mode, dir=save_dir, group=group,
                     name=f"prepare-{report['corpus']}-{report['tokenizer']['type']}",
                     config={"source": report["source"], "tokenizer": report["tokenizer"]["type"]})
    table = wandb.Table(columns=["section", "name", "documents", "bytes", "tokens"])
    table.add_data("input", "all", report["input"]["documents"], report["input"]["bytes"], 0)
    for name, r in report["cleaning"]["removed"].items():
        table.add_data("removed", name, r["documents"], r["bytes"], 0)
    for kind in ("exact", "near"):
        if f"{kind}_removed" in report["dedup"]:
            table.add_data("removed", f"{kind}_duplicates", report["dedup"][f"{kind}_removed"], report["dedup"][f"{kind}_removed_bytes"], 0)
    for name, s in report["splits"].items():
        table.add_data("split", name, s["documents"], s["bytes"], s["tokens"])
    run.log({"prepare/report": table})
    run.summary.update(_flatten(report))
    folder = run.dir
    run.finish()
    return os.path.dirname(folder)
