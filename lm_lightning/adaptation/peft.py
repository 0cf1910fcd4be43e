"""Parameter-efficient fine-tuning: train a few new parameters, keep the pre-trained ones frozen.

- LoRA (Hu et al. 2021): a linear layer W gets a low-rank update, y = W·x + (α/r)·B·A·x with
  A (r, in) and B (out, r); B starts at zero, so the model is unchanged until it trains. The update
  can be merged into W for inference at no extra cost, and saved alone as a small adapter checkpoint.
  A token embedding E (vocab, dim) gets the same kind of update, E + (α/r)·(B·A)ᵀ: a rank-r
  correction to every token's vector, for tasks whose signal is in words the pre-training corpus
  rarely used (as ``peft``'s LoRA on ``nn.Embedding``).
- Bottleneck adapters (Houlsby et al. 2019): h + W_up·σ(W_down·h) after a block's feed-forward
  (and/or attention); W_up starts at zero, so again the model is unchanged at the start.
- Prompt tuning (Lester et al. 2021): n learned embeddings prepended to the input of a frozen GPT.

Plain ``torch.nn``: each ``apply_*`` rewrites a model in place and freezes every parameter except
the adaptation ones (LoRA, adapters, soft prompts), so several methods compose; unfreeze a task
head yourself after applying them.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from lm_lightning.errors import UserError
from lm_lightning.models.layers import Block

LORA_PARAMETERS = ("lora_A", "lora_B")
ADAPTER_PLACES = ("mlp", "attn", "both")


# ---------------------------------------------------------------- LoRA


class _Mergeable(nn.Module):
    """A frozen ``weight`` (the wrapped layer's own parameter) with a low-rank update ``delta_weight()``,
    scaled by alpha / rank, that can be folded into it and back out."""

    def __init__(self, weight: nn.Parameter, rank: int, alpha: float) -> None:
        super().__init__()
        self.rank, self.scaling = rank, alpha / rank
        self.weight = weight
        self.weight.requires_grad_(False)
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        """Adds the update into the base weight (inference at the base layer's cost); idempotent."""
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Takes the update back out of the base weight (to train on, or to swap adapters); idempotent."""
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False


class LoRALinear(_Mergeable):
    """A frozen ``nn.Linear`` plus a trainable low-rank update: (…, in) → (…, out).

    The base ``weight`` and ``bias`` are the wrapped layer's own parameters under the same names,
    so a full state dict keeps the base layer's keys (plus ``lora_A`` and ``lora_B``).
    """

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__(base.weight, rank, alpha)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_parameter("bias", base.bias)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **like))
        # A as nn.Linear's default init (as the paper's code and peft), B zero: the update B·A starts at 0
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """The update (α/r)·B·A, shape (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:  # the update is inside the weight already
            return y
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"scaling={self.scaling:g}, merged={self.merged}")


class LoRAEmbedding(_Mergeable):
    """A frozen ``nn.Embedding`` plus a trainable low-rank update: ids (…) → vectors (…, dim).

    ``lora_A`` (r, vocab) starts at zero and ``lora_B`` (dim, r) random, as in ``peft``, so the
    embedding is unchanged until it trains. When the embedding's weight is tied to other layers
    (``sharers``: GPT's ``lm_head`` with ``tie_embeddings``), the update changes the inputs only; so
    ``merge`` first gives those layers their own frozen copy of the base table (the merged model then
    computes what the unmerged one did), and ``unmerge`` ties them to the table again.
    """

    def __init__(self, base: nn.Embedding, rank: int = 8, alpha: float = 16.0,
                 sharers: list[nn.Module] | None = None) -> None:
        super().__init__(base.weight, rank, alpha)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx = base.padding_idx
        self.sharers = list(sharers or [])  # a plain list: not submodules, so not in this layer's state dict
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.zeros(rank, self.num_embeddings, **like))
        self.lora_B = nn.Parameter(torch.randn(self.embedding_dim, rank, **like))

    def delta_weight(self) -> torch.Tensor:
        """The update (α/r)·(B·A)ᵀ, shape (vocab, dim)."""
        return (self.lora_B @ self.lora_A).T * self.scaling

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        y = F.embedding(idx, self.weight, self.padding_idx)
        if self.merged:
            return y
        return y + F.embedding(idx, self.lora_A.T) @ self.lora_B.T * self.scaling

    def merge(self) -> None:
        """Adds the update into the embedding table (a tied head keeps a copy of the base table); idempotent."""
        if not self.merged:
            for layer in self.sharers:
                layer.weight = nn.Parameter(self.weight.detach().clone(), requires_grad=False)
        super().merge()

    def unmerge(self) -> None:
        """Takes the update back out of the table and ties the sharing layers to it again; idempotent."""
        if self.merged:
            super().unmerge()
            for layer in self.sharers:
                layer.weight = self.weight

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}, scaling={self.scaling:g}, "
                f"tied={bool(self.sharers)}, merged={self.merged}")


LORA_LAYERS = (LoRALinear, LoRAEmbedding)


def apply_lora(model: nn.Module, targets: str | list[str], rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.0) -> list[str]:
    """Wraps every ``nn.Linear`` named by ``targets`` in a ``LoRALinear`` (every ``nn.Embedding`` in a
    ``LoRAEmbedding``) and freezes the rest of the model; returns the wrapped layers' qualified names.

    A target matches a layer's qualified name (``h.0.attn.c_attn``) exactly, as a suffix after a dot
    (``"c_attn"`` matches every ``*.c_attn``), or as a regex with ``re.fullmatch``
    (``r"h\\.\\d+\\.mlp\\..*"``). A target that matches no linear or embedding layer is an error.
    ``dropout`` applies to linear layers' LoRA input (an embedding's input is token ids).

    A linear layer whose weight is tied to another parameter (GPT's ``lm_head``, tied to ``wte``) is
    never wrapped: merging would change the token embeddings too. Naming only tied layers is an
    error; a broad regex that also matches one skips it with a warning. A tied embedding (``wte``) can
    be wrapped: its update changes the inputs only (see ``LoRAEmbedding``).
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise UserError("LoRA needs at least one target layer name or pattern, e.g. 'c_attn'")
    if rank < 1:
        raise UserError(f"LoRA rank={rank} must be 1 or more")
    if alpha <= 0:
        raise UserError(f"LoRA alpha={alpha} must be positive")
    if not 0 <= dropout < 1:
        raise UserError(f"LoRA dropout={dropout} must be in [0, 1)")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding)) and name}
    wrapped = [name for name, m in model.named_modules() if isinstance(m, LORA_LAYERS)]
    tied = _tied_parameter_ids(model)
    chosen: list[str] = []
    for target in targets:
        hits = [name for name in layers if name_matches(target, name)]
        if not hits:
            if any(name_matches(target, name) for name in wrapped):
                raise UserError(f"LoRA target '{target}' names layers that already have LoRA; apply it once")
            raise UserError(f"LoRA target '{target}' matches no nn.Linear or nn.Embedding layer; those layers are "
                            f"named like {_examples(layers)}")
        tied_hits = [name for name in hits if isinstance(layers[name], nn.Linear) and id(layers[name].weight) in tied]
        if tied_hits and len(tied_hits) == len(hits):
            raise UserError(f"LoRA target '{target}' is {', '.join(tied_hits)}, whose weight is tied to the token "
                            "embedding: merging would change the input embeddings too; build the model with "
                            "tie_embeddings=false to adapt its output head")
        if tied_hits:
            warnings.warn(f"LoRA target '{target}': skipping {', '.join(tied_hits)}, whose weight is tied to another "
                          "parameter", stacklevel=2)
        chosen += [name for name in hits if name not in tied_hits and name not in chosen]
    for name in chosen:
        parent_name, _, attribute = name.rpartition(".")
        base = layers[name]
        if isinstance(base, nn.Embedding):
            sharers = [m for m in model.modules() if m is not base and getattr(m, "weight", None) is base.weight]
            layer = LoRAEmbedding(base, rank, alpha, sharers)
        else:
            layer = LoRALinear(base, rank, alpha, dropout)
        setattr(model.get_submodule(parent_name), attribute, layer)
    _freeze_all_but_adaptation(model)
    return chosen


def merge_lora(model: nn.Module) -> int:
    """Merges every LoRA update into its base weight; returns the number of LoRA layers."""
    layers = _lora_layers(model)
    for layer in layers:
        layer.merge()
    return len(layers)


def unmerge_lora(model: nn.Module) -> int:
    """Takes every merged LoRA update back out of its base weight; returns the number of LoRA layers."""
    layers = _lora_layers(model)
    for layer in layers:
        layer.unmerge()
    return len(layers)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors (``<layer>.lora_A``, ``<layer>.lora_B``): an adapter checkpoint that is
    r·(in + out) numbers per wrapped layer instead of the whole model."""
    _lora_layers(model)
    return {key: value for key, value in model.state_dict().items() if key.rpartition(".")[2] in LORA_PARAMETERS}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads an adapter checkpoint from ``lora_state_dict`` into a model wrapped by ``apply_lora``
    with the same targets and rank; the keys and shapes must match exactly."""
    expected = lora_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"the LoRA adapter does not fit this model (missing: {_few(missing)}; unexpected: "
                        f"{_few(unexpected)}): call apply_lora with the targets the adapter was trained with")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise UserError(f"LoRA tensor {key} has shape {tuple(value.shape)} but the model's is "
                            f"{tuple(expected[key].shape)}: call apply_lora with the adapter's rank")
    if any(layer.merged for layer in _lora_layers(model)):
        raise UserError("the model's LoRA updates are merged into its weights: call unmerge_lora before loading "
                        "another adapter")
    for key, value in state.items():
        model.get_parameter(key).copy_(value)


def name_matches(target: str, name: str, what: str = "LoRA target") -> bool:
    """Whether a layer's qualified ``name`` is ``target``, ends with ``.target``, or fully matches it as a regex."""
    if name == target or name.endswith("." + target):
        return True
    try:
        return re.fullmatch(target, name) is not None
    except re.error as error:
        raise UserError(f"{what} '{target}' is not a valid regular expression: {error}") from None


def _lora_layers(model: nn.Module) -> list[LoRALinear | LoRAEmbedding]:
    layers = [m for m in model.modules() if isinstance(m, LORA_LAYERS)]
    if not layers:
        raise UserError("the model has no LoRA layers: call apply_lora first")
    return layers


def _tied_parameter_ids(model: nn.Module) -> set[int]:
    """Parameters registered under more than one name (tied weights)."""
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {key for key, n in counts.items() if n > 1}


def _examples(layers: dict[str, nn.Module], limit: int = 8) -> str:
    """One name per layer kind (``h.0.attn.c_attn`` for every ``h.N.attn.c_attn``), the first ``limit``."""
    kinds: dict[str, str] = {}
    for name in layers:
        kinds.setdefault(re.sub(r"\.\d+(?=\.|$)", ".N", name), name)
    names = list(kinds.values())
    more = f", … ({len(layers)} in all)" if len(layers) > len(names[:limit]) else ""
    return ", ".join(names[:limit]) + more if names else "(none: the model has no nn.Linear or nn.Embedding layers)"


def _few(keys: list[str], limit: int = 4) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:limit]) + (f", … ({len(keys)} in all)" if len(keys) > limit else "")


# ---------------------------------------------------------------- bottleneck adapters


class Adapter(nn.Module):
    """Houlsby bottleneck adapter with its own residual: h + W_up·GELU(W_down·h), (B, T, dim) → (B, T, dim).

    W_up and its bias start at zero, so a new adapter is the identity.
    """

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        if bottleneck < 1:
            raise UserError(f"adapter bottleneck={bottleneck} must be 1 or more")
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.gelu(self.down(h)))


class AdaptedSublayer(nn.Module):
    """A block's sublayer (feed-forward or self-attention) whose output goes through an adapter
    before the block adds it to the residual stream (Houlsby's placement)."""

    def __init__(self, sublayer: nn.Module, adapter: Adapter) -> None:
        super().__init__()
        self.sublayer, self.adapter = sublayer, adapter

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.adapter(self.sublayer(*args, **kwargs))


def apply_adapters(model: nn.Module, bottleneck: int = 16, after: str = "mlp") -> int:
    """Inserts an ``Adapter`` after the feed-forward (``after="mlp"``), the self-attention
    (``"attn"``) or both (``"both"``, as Houlsby et al.) of every transformer ``Block`` (GPT, Encoder,
    EncoderDecoder), freezes the rest of the model, and returns the number of adapters inserted."""
    if after not in ADAPTER_PLACES:
        raise UserError(f"adapters after={after!r} is not known: choose {', '.join(ADAPTER_PLACES)}")
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise UserError(f"{type(model).__name__} has no transformer blocks to put adapters in")
    places = ("attn", "mlp") if after == "both" else (after,)
    inserted = 0
    for block in blocks:
        for place in places:
            sublayer = getattr(block, place)
            if isinstance(sublayer, AdaptedSublayer):
                raise UserError(f"the blocks already have adapters after {place}: apply them once")
            dim = block.ln_1.normalized_shape[0]
            setattr(block, place, AdaptedSublayer(sublayer, Adapter(dim, bottleneck).to(block.ln_1.weight)))
            inserted += 1
    _freeze_all_but_adaptation(model)
    return inserted


# ---------------------------------------------------------------- prompt tuning


class SoftPrompt(nn.Module):
    """``n_tokens`` learned input embeddings, (n_tokens, dim), repeated for every sequence of a batch."""

    def __init__(self, n_tokens: int, dim: int, init_std: float = 0.02) -> None:
        super().__init__()
        if n_tokens < 1:
            raise UserError(f"soft prompt n_tokens={n_tokens} must be 1 or more")
        self.weight = nn.Parameter(torch.randn(n_tokens, dim) * init_std)

    def forward(self, batch: int) -> torch.Tensor:
        """(batch, n_tokens, dim)."""
        return self.weight.expand(batch, -1, -1)


class PromptTunedGPT(nn.Module):
    """A frozen GPT reading ``n_tokens`` soft-prompt embeddings before each sequence:
    token ids (B, T) → logits (B, T, vocab_size) for the T real positions.

    The prompt takes positions 0..n_tokens-1 and the tokens follow it, so with learned or
    sinusoidal positions, RoPE, ALiBi or T5 biases the tokens sit n_tokens further on; the context
    left for tokens is ``block_size - n_tokens``. The prompt starts as the embeddings of random
    vocabulary tokens, which Lester et al. found trains better than random vectors. No KV cache:
    every call reads the whole sequence (causal, also for a prefix-LM GPT).
    """

    def __init__(self, model: nn.Module, n_tokens: int) -> None:
        super().__init__()
        block_size = model.config.block_size
        if not 1 <= n_tokens < block_size:
            raise UserError(f"soft prompt n_tokens={n_tokens} must be between 1 and the context length "
                            f"{block_size} minus 1")
        self.model, self.n_tokens = model, n_tokens
        self.prompt = SoftPrompt(n_tokens, model.config.n_embd).to(model.wte.weight)
        with torch.no_grad():
            vocabulary = torch.randint(model.config.vocab_size, (n_tokens,), device=model.wte.weight.device)
            self.prompt.weight.copy_(model.wte.weight[vocabulary])
        _freeze_all_but_adaptation(self)

    @property
    def config(self):
        return self.model.config

    @property
    def context_length(self) -> int:
        """Tokens a sequence may have after the soft prompt."""
        return self.model.config.block_size - self.n_tokens

    def features(self, idx: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, T, n_embd) of the T real positions."""
        m, P, T = self.model, self.n_tokens, idx.size(1)
        if P + T > m.config.block_size:
            raise UserError(f"a sequence of {T} tokens after the {P}-token soft prompt exceeds the context of "
                            f"{m.config.block_size}: keep inputs to {self.context_length} tokens")
        # GPT.forward's embedding step over the longer sequence [prompt; tokens]
        x = torch.cat([self.prompt(idx.size(0)), m.wte(idx)], dim=1)
        L = P + T
        if m.wpe is not None:
            x = x + m.wpe(torch.arange(L, device=idx.device))
        elif m.config.position == "sinusoidal":
            x = x + m.sinusoid[:L]
        x = m.drop(x)
        bias = m.position_bias(0, L, L, causal=True, dtype=x.dtype) if m.position_bias else None
        for block in m.h:  # RoPE rotates inside attention, from position 0
            x = block(x, causal=True, bias=bias)
        return m.ln_f(x[:, P:])

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.features(idx))


# ---------------------------------------------------------------- shared


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, each tied parameter counted once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)


def _freeze_all_but_adaptation(model: nn.Module) -> None:
    """Only LoRA updates, adapters and soft prompts keep training."""
    keep: set[int] = set()
    for module in model.modules():
        if isinstance(module, LORA_LAYERS):
            keep |= {id(module.lora_A), id(module.lora_B)}
        elif isinstance(module, (Adapter, SoftPrompt)):
            keep |= {id(p) for p in module.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
