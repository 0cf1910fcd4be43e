"""Int8 linear layers for CPU inference: post-training quantization and quantization-aware training.

- Weights: symmetric int8 per output channel, ``w ≈ q · s`` with ``q ∈ [-127, 127]`` and
  ``s = max|w_row| / 127``: a weight matrix takes a quarter of its fp32 bytes, plus one fp32 scale a row.
- ``weight`` scheme (weight-only): the int8 matrix is widened and rescaled to fp32 at run time, then
  multiplies fp32 activations (the saving is memory and disk; the matmul is fp32's).
- ``dynamic`` scheme: each token's input row is quantized the same way at run time (``s_x = max|x| / 127``),
  the product runs as an int8 × int8 → int32 matmul (``torch._int_mm``) and is rescaled by ``s_x · s_w``.
- Quantization-aware training (Jacob et al. 2018): :class:`FakeQuantLinear` rounds its weight (and, for
  the dynamic scheme, its input) exactly as :class:`Int8Linear` will, in fp32, and passes the gradient
  through the rounding unchanged (straight-through estimator); :func:`quantize_linears` then converts it.

Only ``nn.Linear`` layers are quantized. Embeddings, norms and a head tied to the token embedding stay
fp32 (an int8 copy of a tied head would add bytes, not save them).

Plain torch ops (``torch._int_mm``, int8 tensors): the int8 state dict is int8 and fp32 tensors that
any torch loads. torchao 0.18 runs on torch 2.13's CPU only through its Python fallbacks (slower than
fp32 here). ``torch.ao.quantization.quantize_dynamic`` has faster fused fbgemm kernels
(``benchmarks/quantize_bench.py`` compares), but it and its quantized tensors are deprecated, it has no
int8 weight-only linear layer, and it rounds activations to 7 bits, which fake quantization would have
to imitate to make QAT's converted model compute what it trained.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lm_lightning.adaptation.peft import name_matches
from lm_lightning.errors import UserError
from lm_lightning.models.base import Trait
from lm_lightning.models.capabilities import families_where

SCHEMES = ("weight", "dynamic")
# decoder-only transformers (causal, with transformer blocks): every matmul but attention is an nn.Linear
SUPPORTED_FAMILIES = families_where(lambda cls, traits: Trait.CAUSAL in traits and bool(cls.block_lists))
INT8_MAX = 127  # symmetric range [-127, 127]: -128 is left out so that q and -q both fit
FORMAT = "lm-lightning-int8/1"
OUTPUT_BLOCK_ELEMENTS = 2**16  # fp32 output elements an int8 matmul rescales at a time (256 KiB: in L2 cache)


def quantize_symmetric(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` (…, n) as int8 ``q`` (…, n) and fp32 scales ``s`` (…, 1) with ``x ≈ q · s``,
    ``s = max|row| / 127`` (a zero row gets a tiny scale and quantizes to zeros)."""
    scale = x.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / INT8_MAX
    q = (x.detach().float() / scale).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to its int8 grid (per row, as :func:`quantize_symmetric`) but kept in x's dtype;
    the gradient passes through the rounding unchanged (straight-through estimator)."""
    q, scale = quantize_symmetric(x)
    return x + (q.to(x.dtype) * scale.to(x.dtype) - x).detach()


class Int8Linear(nn.Module):
    """An ``nn.Linear`` (…, in) → (…, out) with an int8 weight (out, in) and fp32 row ``scale`` (out,).

    ``activations=False``: weight-only (the weight is widened and rescaled to fp32 for each call);
    ``activations=True``: dynamic per-token int8 inputs and an int8 × int8 → int32 matmul.
    Inference only: the weight, scale and bias are buffers, not parameters.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activations: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.activations = in_features, out_features, activations
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, activations: bool = False) -> Int8Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, activations)
        q, scale = quantize_symmetric(linear.weight)
        layer.weight.copy_(q)
        layer.scale.copy_(scale.squeeze(1))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.float())
        return layer.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if not self.activations:  # weight-only: widen and rescale the matrix, then one fp32 matmul
            return F.linear(x, self.weight.to(x.dtype).mul_(self.scale.to(x.dtype)[:, None]), bias)
        rows, x_scale = quantize_symmetric(x.reshape(-1, self.in_features))
        scale = self.scale.to(x.dtype)
        out = torch.empty(rows.size(0), self.out_features, dtype=x.dtype, device=x.device)
        # rows in blocks whose (rows, out) result stays in the CPU cache while it is rescaled: at a small
        # model's sizes the element-wise passes over the output, not the matmul, would decide the speed
        step = max(1, OUTPUT_BLOCK_ELEMENTS // self.out_features)
        for start in range(0, rows.size(0), step):
            block = slice(start, start + step)
            y = torch.mul(torch._int_mm(rows[block], self.weight.t()), x_scale[block].to(x.dtype))  # int32 → float
            out[block] = y.mul_(scale) if bias is None else torch.addcmul(bias, y, scale)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"activations={'dynamic int8' if self.activations else 'fp32 (weight-only)'}")


class FakeQuantLinear(nn.Linear):
    """An ``nn.Linear`` that trains through int8 rounding: its weight (and with ``activations`` its
    input) is fake-quantized in every forward exactly as :class:`Int8Linear` quantizes it. The
    parameters keep nn.Linear's names, so its state dict loads into the fp32 model unchanged."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activations: bool = False,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.activations = activations

    @classmethod
    def from_linear(cls, linear: nn.Linear, activations: bool = False) -> FakeQuantLinear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, activations,
                    device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias  # the same Parameters: nothing is copied
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_quantize(x) if self.activations else x, fake_quantize(self.weight), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fake int8 weight{' and input' if self.activations else ''}"


def check_supported(model: nn.Module) -> None:
    """Refuses a model family this module has not been checked on (encoders, encoder-decoders, recurrent
    and feed-forward LMs: their sizes, speeds and int8 accuracy are not measured here)."""
    family = getattr(getattr(model, "config", None), "family", type(model).__name__)
    if family not in SUPPORTED_FAMILIES:
        raise UserError(f"int8 quantization supports {' and '.join(SUPPORTED_FAMILIES)} models; this is a {family} "
                        "model (quantize its nn.Linear layers with quantize_linears at your own risk)")


def quantize_linears(model: nn.Module, scheme: str, layers: list[str] | None = None) -> list[str]:
    """Replaces the chosen linear layers (plain or :class:`FakeQuantLinear`) by :class:`Int8Linear`, in
    place; returns their qualified names. ``scheme``: ``weight`` (weight-only) or ``dynamic``."""
    if scheme not in SCHEMES:
        raise UserError(f"int8 scheme {scheme!r} is not known: choose {' or '.join(SCHEMES)}")
    chosen = select_linears(model, layers)
    for name in chosen:
        _replace(model, name, Int8Linear.from_linear(model.get_submodule(name), activations=scheme == "dynamic"))
    return chosen


def prepare_qat(model: nn.Module, activations: bool, layers: list[str] | None = None) -> list[str]:
    """Replaces the chosen linear layers by :class:`FakeQuantLinear` sharing their parameters, in place;
    ``activations`` also fake-quantizes their inputs (training for the ``dynamic`` scheme)."""
    chosen = select_linears(model, layers)
    for name in chosen:
        _replace(model, name, FakeQuantLinear.from_linear(model.get_submodule(name), activations))
    return chosen


def select_linears(model: nn.Module, layers: list[str] | None = None) -> list[str]:
    """Qualified names of the linear layers to quantize: with ``layers=None`` every ``nn.Linear`` except
    one tied to another parameter (GPT's ``lm_head``, tied to ``wte``).

    A name in ``layers`` matches a layer's qualified name (``h.0.attn.c_attn``) exactly, as a suffix after
    a dot (``c_fc`` matches every ``*.c_fc``), or as a regex with ``re.fullmatch``. A name that matches no
    linear layer, only other kinds of layer (an embedding, an LSTM, a norm) or only a tied head is an error.
    """
    modules = {name: m for name, m in model.named_modules() if name}
    linears = {name: m for name, m in modules.items() if isinstance(m, nn.Linear)}
    tied = _tied_parameter_ids(model)
    if layers is None:
        return [name for name, m in linears.items() if id(m.weight) not in tied]
    chosen: list[str] = []
    for target in layers:
        hits = [name for name in linears if name_matches(target, name, "layer")]
        if not hits:
            _refuse(target, modules, {name: m for name, m in linears.items() if id(m.weight) not in tied})
        own = [name for name in hits if id(linears[name].weight) not in tied]
        if not own:
            raise UserError(f"layer '{target}' is {', '.join(hits)}, whose weight is tied to the token embedding: "
                            "it stays fp32 with the embedding (build the model with tie_embeddings=false to "
                            "quantize its head)")
        chosen += [name for name in own if name not in chosen]
    return chosen


def _refuse(target: str, modules: dict[str, nn.Module], linears: dict[str, nn.Module]) -> None:
    """The one-line error for a layer name that matches no linear layer."""
    others = [name for name in modules if name_matches(target, name, "layer")]
    if others:
        kind = type(modules[others[0]]).__name__
        if isinstance(modules[others[0]], Int8Linear):
            raise UserError(f"layer '{target}' ({others[0]}) is int8 already: quantize a model once")
        what = "an embedding table" if isinstance(modules[others[0]], nn.Embedding) else f"a {kind}"
        raise UserError(f"layer '{target}' ({others[0]}) is {what}, which int8 quantization does not cover: only "
                        f"nn.Linear layers have int8 kernels here (embeddings, norms and recurrent cells stay "
                        f"fp32); linear layers are named like {_examples(linears)}")
    raise UserError(f"layer '{target}' matches no layer of the model; linear layers are named like "
                    f"{_examples(linears)}")


def _examples(linears: dict[str, nn.Module], limit: int = 6) -> str:
    """One name per kind of layer (``h.0.attn.c_attn`` stands for every ``h.N.attn.c_attn``)."""
    kinds: dict[str, str] = {}
    for name in linears:
        kinds.setdefault(re.sub(r"\.\d+(?=\.|$)", ".N", name), name)
    return ", ".join(list(kinds.values())[:limit]) or "(none: the model has no nn.Linear layer)"


def _tied_parameter_ids(model: nn.Module) -> set[int]:
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {key for key, n in counts.items() if n > 1}


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent), attribute, layer)


# ---------------------------------------------------------------- size and speed


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the linear layers' weight matrices (an int8 layer's row scales included), biases not
    counted; a head tied to the embedding is the embedding's bytes and is not counted either."""
    tied = _tied_parameter_ids(model)
    total = 0
    for module in model.modules():
        if isinstance(module, Int8Linear):
            total += _bytes(module.weight) + _bytes(module.scale)
        elif isinstance(module, nn.Linear) and id(module.weight) not in tied:
            total += _bytes(module.weight)
    return total


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in the state dict, a shared (tied) tensor counted once."""
    tensors = {t.data_ptr(): _bytes(t) for t in model.state_dict().values()}
    return sum(tensors.values())


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@torch.inference_mode()
def forward_tokens_per_second(models: dict[str, nn.Module], batch_size: int, seq_len: int,
                              repeats: int = 5) -> dict[str, float]:
    """Tokens per second of each model's forward pass over the same random (batch_size, seq_len) token
    ids. The models take turns, one pass each per round, so a busy machine slows them alike; each
    model's fastest of ``repeats`` rounds counts (the least disturbed), after one warm-up pass."""
    some = next(iter(models.values()))
    idx = torch.randint(some.config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    seconds = _fastest({name: (lambda m=model: m.eval()(idx)) for name, model in models.items()}, repeats)
    return {name: batch_size * seq_len / s for name, s in seconds.items()}


def generation_tokens_per_second(models: dict[str, nn.Module], new_tokens: int, repeats: int = 3) -> dict[str, float]:
    """Tokens per second of greedy decoding with the KV cache, one sequence from a one-token prompt, of
    ``new_tokens`` tokens (at most the context length − 1); in turns and fastest of ``repeats``, as
    :func:`forward_tokens_per_second`."""
    from lm_lightning.generation.sampling import generate

    some = next(iter(models.values()))
    new_tokens = min(new_tokens, some.config.block_size - 1)
    prompt = torch.zeros(1, 1, dtype=torch.long)
    runs = {name: (lambda m=model: generate(m, prompt, new_tokens, temperature=0)) for name, model in models.items()}
    return {name: new_tokens / s for name, s in _fastest(runs, repeats).items()}


def _fastest(runs: dict[str, Any], repeats: int) -> dict[str, float]:
    """Seconds of each run's fastest call, the runs taking turns after one warm-up call each."""
    best = {name: float("inf") for name in runs}
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if round_:  # round 0 warms up
                best[name] = min(best[name], time.perf_counter() - start)
    return best


# ---------------------------------------------------------------- saving and loading


def save_int8(path: str | Path, model: nn.Module, task_hparams: dict, tokenizer_model: bytes | None) -> Path:
    """Writes an int8 model as one ``torch.save`` file: the training task's model and objective configs,
    which layers are int8 and how, the state dict (int8 weights, fp32 scales and the rest) and the
    tokenizer. :func:`load_int8` reads it back."""
    layers = {name: "dynamic" if m.activations else "weight" for name, m in model.named_modules()
              if isinstance(m, Int8Linear)}
    from lm_lightning.training.checkpoint_io import save_checkpoint_file

    return save_checkpoint_file({"format": FORMAT, "model_config": dict(task_hparams["model"]),
                                 "objective_config": dict(task_hparams["objective"]), "int8_layers": layers,
                                 "state_dict": model.state_dict(), "tokenizer_model": tokenizer_model}, path)


def load_int8(path: str | Path):
    """An int8 model written by :func:`save_int8`, as ``runtime.load_trained`` gives a checkpoint: a
    LanguageModelTask in eval mode (``task.model`` holds the int8 layers, ``task.objective`` scores it)
    and the tokenizer."""
    from lm_lightning.data.tokenizer import load_tokenizer
    from lm_lightning.tasks.language_model import LanguageModelTask
    from lm_lightning.training.checkpoint_io import load_checkpoint_file

    try:
        saved = load_checkpoint_file(path)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"int8 model {path} could not be read ({type(err).__name__}: {err})") from err
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise UserError(f"{path} is not an int8 model written by lm-lightning quantize")
    task = LanguageModelTask(saved["model_config"], saved["objective_config"], tokenizer_model=saved["tokenizer_model"])
    for name, scheme in saved["int8_layers"].items():
        _replace(task.model, name, Int8Linear(*_shape(task.model.get_submodule(name)), activations=scheme == "dynamic"))
    task.model.load_state_dict(saved["state_dict"])
    return task.eval(), load_tokenizer(saved["tokenizer_model"])


def _shape(linear: nn.Linear) -> tuple[int, int, bool]:
    return linear.in_features, linear.out_features, linear.bias is not None
