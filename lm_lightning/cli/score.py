"""``lm-lightning score ckpt_path=<file.ckpt>``: zero-shot classification accuracy of a trained model on a
labelled TSV (default: SST-2 dev), next to the majority-class baseline."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from omegaconf import DictConfig

from lm_lightning.adaptation.classification import read_labelled_tsv
from lm_lightning.adaptation.zero_shot import classify
from lm_lightning.errors import UserError
from lm_lightning.config.app import hydra_command, set_threads
from lm_lightning.training.loading import load_trained


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
