"""``lm-lightning score ckpt_path=<file.ckpt>``: zero-shot classification accuracy of a trained model on a
labelled TSV (default: SST-2 dev), next to the majority-class baseline."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig

from lm_lightning.adaptation.zero_shot import classify
from lm_lightning.errors import UserError
from lm_lightning.runtime import hydra_command, load_trained, set_threads


def read_labelled_tsv(path: Path, text_column: str, label_column: str) -> tuple[list[str], list[int]]:
    if not path.is_file():
        raise UserError(f"data file not found: {path} (pass data_file=<a TSV with a header row>)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise UserError(f"{path} has no rows")
    for column in (text_column, label_column):
        if column not in rows[0]:
            raise UserError(f"{path} has no column {column!r}: its columns are {', '.join(rows[0])}")
    try:
        labels = [int(row[label_column]) for row in rows]
    except ValueError as err:
        raise UserError(f"{path}: column {label_column!r} must hold integer labels ({err})") from err
    return [row[text_column].strip() for row in rows], labels


def score(cfg: DictConfig) -> dict[str, float]:
    set_threads(cfg.get("num_threads"))
    texts, labels = read_labelled_tsv(Path(cfg.data_file), cfg.text_column, cfg.label_column)
    if cfg.max_examples:
        texts, labels = texts[: cfg.max_examples], labels[: cfg.max_examples]
    verbalizers = list(cfg.verbalizers)
    if max(labels) >= len(verbalizers) or min(labels) < 0:
        raise UserError(f"labels run 0..{max(labels)} but verbalizers has {len(verbalizers)} entries: one per label")
    task, tokenizer = load_trained(cfg.ckpt_path)
    predictions = classify(task.model, tokenizer, [cfg.template.format(text=t) for t in texts], verbalizers)
    accuracy = sum(p == y for p, y in zip(predictions, labels)) / len(labels)
    majority_label, majority_count = Counter(labels).most_common(1)[0]
    baseline = majority_count / len(labels)
    print(f"{cfg.data_file}: {len(labels)} examples | zero-shot accuracy {accuracy:.4f} | "
          f"majority-class baseline {baseline:.4f} (label {majority_label}) | verbalizers {verbalizers}", flush=True)
    return {"accuracy": accuracy, "majority_baseline": baseline, "examples": len(labels)}


@hydra_command("score")
def main(cfg: DictConfig) -> float:
    return score(cfg)["accuracy"]


if __name__ == "__main__":
    main()
