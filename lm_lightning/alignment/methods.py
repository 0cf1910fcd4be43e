"""The preference-tuning methods of ``lm-lightning align`` (reward model, DPO, KTO): how each builds its
LightningModule from a pre-trained checkpoint, and the preference data they train and are scored on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import DictConfig

from lm_lightning.alignment.dpo import DPOTask
from lm_lightning.alignment.kto import KTOTask
from lm_lightning.alignment.preference import (
    Encoder,
    PreferenceData,
    as_completions,
    first_per_prompt,
    load_completions,
    load_preference_pairs,
    split_by_prompt,
)
from lm_lightning.alignment.reward import RewardModelTask
from lm_lightning.alignment.task import AlignmentTask
from lm_lightning.models.base import Trait
from lm_lightning.models.capabilities import families_where, has_features

# decoders whose model(ids) is next-token logits and whose features() a head reads
FAMILIES = families_where(lambda cls, traits: Trait.CAUSAL in traits and has_features(cls))


def build_reward_model(cfg: DictConfig, pretrained, optimizer, scheduler) -> AlignmentTask:
    return RewardModelTask(dict(pretrained.hparams.model), cfg.reward_model.dropout, optimizer, scheduler,
                           backbone_state=pretrained.model.state_dict(), tokenizer_model=pretrained.tokenizer_model)


def build_dpo(cfg: DictConfig, pretrained, optimizer, scheduler) -> AlignmentTask:
    return DPOTask(pretrained.model, cfg.dpo.beta, optimizer, scheduler)


def build_kto(cfg: DictConfig, pretrained, optimizer, scheduler) -> AlignmentTask:
    return KTOTask(pretrained.model, cfg.kto.beta, cfg.kto.desirable_weight, cfg.kto.undesirable_weight,
                   optimizer, scheduler)


@dataclass(frozen=True)
class Method:
    build: Callable[..., AlignmentTask]  # (cfg, pre-trained LanguageModelTask, optimizer, scheduler) → task
    title: str                           # how the summary names it
    accuracy: str                        # what val/accuracy measures
    unpaired: bool = False               # trains on unpaired rows (KTO) rather than pairs


METHODS = {
    "reward_model": Method(build_reward_model, "reward model (Bradley–Terry)", "pairwise accuracy"),
    "dpo": Method(build_dpo, "DPO", "implicit-reward accuracy"),
    "kto": Method(build_kto, "KTO", "implicit-reward accuracy", unpaired=True),
}


def build_data(cfg: DictConfig, tokenizer, context: int, unpaired: bool) -> tuple[PreferenceData, dict[str, int]]:
    """The training examples (pairs, or unpaired rows for KTO) and the held-out pairs, tokenized."""
    d = cfg.data
    pairs = load_preference_pairs(d.format, d.path, d.rejected, cfg.seed, d.per_prompt)
    train, val = split_by_prompt(pairs, d.val_fraction, cfg.seed)
    if d.format == "synthetic":  # the extra shuffles of an answer augment training; held out, one pair per prompt
        val = first_per_prompt(val)
    if d.max_train_pairs:
        train = train[: d.max_train_pairs]
    encoder = Encoder(tokenizer, d.max_prompt_tokens, min(d.max_length or context, context))
    if unpaired:
        rows = load_completions(d.unpaired_path) if d.unpaired_path else as_completions(train)
        train_examples = encoder.unpaired(rows, cfg.seed)
    else:
        train_examples = [encoder.pair(p) for p in train]
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id
    data = PreferenceData(train_examples, [encoder.pair(p) for p in val], d.batch_size, d.val_batch_size, pad_id, cfg.seed)
    return data, {"pairs": len(pairs), "train_examples": len(train_examples), "val_pairs": len(val)}
