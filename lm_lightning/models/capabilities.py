"""What each model family can do, read from the classes the configs build; checked when a config is composed.

A model class declares the families it builds and, for each, the :class:`Trait` s it meets (``families``),
its ``config_class`` and its ``block_lists`` (``models/base.py``); an objective class declares the traits
it ``requires``. An objective trains a family when the family meets all of them: causal LM needs a
left-to-right model, prefix LM a bidirectional prefix, masked LM a bidirectional model, NSP also BERT's
[CLS] head, and span corruption, denoising and UL2 an encoder and a decoder.

``conf/model/*.yaml`` names each class through its ``_target_``, so a new family is a model module and a
YAML file: the table, the architecture × objective grid and every eligibility list (fine-tuning,
alignment, quantization, export, FSDP2) follow from the declarations read here.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path

import hydra
from omegaconf import OmegaConf

from lm_lightning.config.app import CONF_DIR
from lm_lightning.errors import IncompatiblePair, UserError
from lm_lightning.models.base import LanguageModel, Trait

ConfigDirs = tuple[str, ...]  # extra config folders (Hydra search-path entries) beside the package's conf/


def model_class(model_cfg: Mapping) -> type[LanguageModel]:
    """The class a model config builds: its ``_target_`` is a LanguageModel class or one of its class
    methods (``lm_lightning.models.gpt.build_gpt`` is ``GPT.build``)."""
    target = model_cfg.get("_target_")
    try:
        built = hydra.utils.get_object(target)
    except Exception as err:
        raise UserError(f"model._target_={target} cannot be imported: {err}") from None
    cls = built if isinstance(built, type) else getattr(built, "__self__", None)
    if not (isinstance(cls, type) and issubclass(cls, LanguageModel)):
        raise UserError(f"model._target_={target} is not a LanguageModel class or its build method")
    return cls


def family_of(model_cfg: Mapping) -> str:
    """The family key of a model config (a bidirectional recurrent model is ``bidirectional <cell>``)."""
    cls = model_class(model_cfg)
    if model_cfg.get("family") is None:
        raise UserError("the model config has no 'family' key: add one of " + ", ".join(cls.families))
    family = cls.family_key(model_cfg)
    if family not in cls.families:
        raise UserError(f"model.family={family!r} is not known: choose one of {', '.join(cls.families)}")
    return family


def traits_of(model_cfg: Mapping) -> frozenset[Trait]:
    """What the family of a model config meets."""
    return model_class(model_cfg).families[family_of(model_cfg)]


def objective_class(objective_cfg: Mapping) -> type:
    return hydra.utils.get_class(objective_cfg["_target_"])


def objective_name(objective_cfg: Mapping) -> str:
    """The objective's name, from the class its config builds."""
    return objective_class(objective_cfg).name


def group_configs(group: str, config_dirs: ConfigDirs = ()) -> dict[str, dict]:
    """``<group>/<name>.yaml`` of the package's conf/ and of each extra config folder, by name (sorted),
    with the defaults they take from their own group applied (``bilstm.yaml``: ``defaults: [lstm]``)."""
    paths: dict[str, Path] = {}
    for root in (CONF_DIR, *config_dirs):
        for path in sorted((Path(root) / group).glob("*.yaml")):
            paths.setdefault(path.stem, path)

    def load(name: str) -> dict:
        node = OmegaConf.load(paths[name])
        merged = OmegaConf.create()
        for entry in node.pop("defaults", []):
            if entry != "_self_":
                merged = OmegaConf.merge(merged, load(entry))
        return OmegaConf.to_container(OmegaConf.merge(merged, node))

    return {name: load(name) for name in sorted(paths)}


@functools.cache
def objective_classes(config_dirs: ConfigDirs = ()) -> tuple[type, ...]:
    """The objective classes of conf/objective/, in the order they are defined (module by module), which
    is the order a refusal lists the valid objectives in."""
    classes = {objective_class(cfg) for cfg in group_configs("objective", config_dirs).values()}
    return tuple(sorted(classes, key=lambda cls: (cls.__module__, inspect.getsourcelines(cls)[1])))


@functools.cache
def families(config_dirs: ConfigDirs = ()) -> dict[str, tuple[type[LanguageModel], frozenset[Trait]]]:
    """Every family the model configs build → (its class, the traits it meets), in config-name order."""
    found = {}
    for cfg in group_configs("model", config_dirs).values():
        cls, family = model_class(cfg), family_of(cfg)
        found[family] = (cls, cls.families[family])
    return found


def valid_objectives(traits: frozenset[Trait], config_dirs: ConfigDirs = ()) -> tuple[str, ...]:
    """The objectives a family that meets ``traits`` trains with."""
    return tuple(objective.name for objective in objective_classes(config_dirs) if objective.requires <= traits)


def check_compatible(model_cfg: Mapping, objective_cfg: Mapping) -> None:
    """Raises an IncompatiblePair naming the valid objectives when the pair cannot train together."""
    family, objective = family_of(model_cfg), objective_class(objective_cfg)
    traits = model_class(model_cfg).families[family]
    if not objective.requires <= traits:
        valid = ", ".join(valid_objectives(traits)) or "none"
        raise IncompatiblePair(f"objective={objective.name} cannot train model family {family}: "
                               f"valid objectives for {family} are {valid}")


def valid_pairs(config_dirs: ConfigDirs = ()) -> list[tuple[str, str]]:
    """Every (family, objective) pair that trains (bidirectional recurrent variants included)."""
    return [(family, objective) for family, (_, traits) in families(config_dirs).items()
            for objective in valid_objectives(traits, config_dirs)]


def grid(config_dirs: ConfigDirs = ()) -> list[tuple[str, str, bool]]:
    """The architecture × objective grid that ``sweeps/arch_objective_grid.yaml`` runs — every model config
    with every objective config — as (model, objective, trains); the sweep skips the pairs that do not."""
    objectives = group_configs("objective", config_dirs)
    return [(model, objective, objective_class(objective_cfg).requires <= traits_of(model_cfg))
            for model, model_cfg in group_configs("model", config_dirs).items()
            for objective, objective_cfg in objectives.items()]


def families_where(test: Callable[[type[LanguageModel], frozenset[Trait]], bool]) -> tuple[str, ...]:
    """The families whose (class, traits) pass ``test``: how each command derives which checkpoints it takes."""
    return tuple(family for family, (cls, traits) in families().items() if test(cls, traits))


def reads_left_to_right(traits: frozenset[Trait]) -> bool:
    """Every position reads only what precedes it, in training and when generating (no bidirectional
    prefix): what PPO's rollouts and the transformers causal-LM classes assume."""
    return Trait.CAUSAL in traits and Trait.PREFIX not in traits


def has_features(cls: type[LanguageModel]) -> bool:
    """The class defines ``features(idx) → (B, T, n_embd)``, the hidden states task heads read."""
    return callable(getattr(cls, "features", None))


def check_blocks_for_sharding(model_cfg: Mapping) -> None:
    """FSDP2 shards a model block by block: refuses a family that declares no repeated blocks."""
    if not model_class(model_cfg).block_lists:
        raise UserError(f"strategy=fsdp2 shards a model block by block and a {family_of(model_cfg)} model "
                        "declares no blocks (block_lists): use strategy=ddp")


def __getattr__(name: str) -> dict[str, tuple[str, ...]]:
    """``VALID_OBJECTIVES``: family → the objectives it trains with, over the package's model configs.
    Built on first use, not at import: reading every model config costs each command's start-up."""
    if name == "VALID_OBJECTIVES":
        return {family: valid_objectives(traits) for family, (_, traits) in families().items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
