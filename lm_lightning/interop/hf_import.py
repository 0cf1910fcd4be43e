"""A Hugging Face ``transformers`` folder (``config.json``, the weights, the tokenizer) as an lm-lightning
checkpoint that ``train init_from=``, ``finetune``, ``generate``, ``evaluate`` and ``export`` take: the
reverse of :mod:`lm_lightning.interop.hf_export`.

Each layout becomes the GPT that computes exactly what the transformers model computes:

| transformers class | ``model`` options |
|---|---|
| ``GPT2LMHeadModel`` | position=learned, norm=layernorm, activation=gelu_tanh (gelu_new) or gelu/relu |
| ``GPTNeoXForCausalLM`` | position=rope, rope_fraction=partial_rotary_factor, parallel_residual=use_parallel_residual, norm=layernorm |
| ``LlamaForCausalLM`` | position=rope, norm=rmsnorm, activation=swiglu, n_kv_head=num_key_value_heads |

``model.bias`` is true when any bias is not zero; the head is tied as ``tie_word_embeddings`` says; the
context is the model's maximum positions unless ``block_size`` is given. Query and key rows are put in
our rotary order (pairs 2i, 2i+1 rather than transformers' halves). Weights are read by transformers
itself (safetensors, or ``pytorch_model.bin`` with ``weights_only``), in float32. What has no exact
counterpart (scaled rotary, a head size other than hidden_size / heads, another activation, ...) is
refused in one line naming the config field. After the mapping the logits of both models are compared
on random tokens (at most 1e-4 apart) before anything is written.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lm_lightning.errors import UserError
from lm_lightning.interop.hf_export import (
    ARCHITECTURES,
    TOLERANCE,
    rotary_order,
    transformers_module,
)
from lm_lightning.models.gpt import GPT, GPTConfig
from lm_lightning.models.layers import hidden_width

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

GPT_TARGET = "lm_lightning.models.gpt.build_gpt"  # conf/model/gpt.yaml's _target_, as a trained checkpoint holds it
CAUSAL_LM_TARGET = "lm_lightning.objectives.causal_lm.CausalLM"  # conf/objective/causal_lm.yaml's
ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh"}  # transformers' name -> ours: the tanh forms agree to ~1e-7


def _refuse(folder: Path, field: str, value: Any, why: str) -> UserError:
    return UserError(f"cannot import {folder}: config.json {field}={value!r} {why}")


class _Reader:
    """The parameters of one transformers model by name, and the checks of its config fields."""

    def __init__(self, hf: PreTrainedModel, folder: Path) -> None:
        self.config: PretrainedConfig = hf.config
        self.folder = folder
        self.params = {name: p.detach() for name, p in hf.named_parameters(remove_duplicate=False)}
        self.embedding = hf.get_input_embeddings().weight.detach()
        self.head = hf.get_output_embeddings().weight.detach()

    def require(self, field: str, expected: Any, why: str) -> None:
        value = getattr(self.config, field, expected)
        if value != expected:
            raise _refuse(self.folder, field, value, why)

    def activation(self, field: str) -> str:
        value = getattr(self.config, field)
        if value not in ACTIVATIONS:
            raise _refuse(self.folder, field, value, f"has no model.activation: lm-lightning reads {', '.join(ACTIVATIONS)}")
        return ACTIVATIONS[value]

    def rope(self) -> dict[str, Any]:
        """rope_base and rope_fraction of plain rotary (no scaling of the frequencies)."""
        rope = dict(getattr(self.config, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") != "default":
            raise _refuse(self.folder, "rope_parameters.rope_type", rope["rope_type"],
                          "(scaled rotary) has no lm-lightning counterpart: only rope_type=default imports")
        return {"rope_base": float(rope.get("rope_theta", 10000.0)),
                "rope_fraction": float(rope.get("partial_rotary_factor", 1.0))}

    def linear(self, name: str, bias: bool, transpose: bool = False) -> dict[str, torch.Tensor]:
        """``weight`` and, when ``bias``, ``bias`` of the layer ``name`` (zeros where it has none;
        GPT-2's Conv1D stores (in, out): ``transpose``)."""
        weight = self.params[f"{name}.weight"]
        out = {"weight": weight.t() if transpose else weight}
        if bias:
            out["bias"] = self.params.get(f"{name}.bias", weight.new_zeros(out["weight"].shape[0]))
        return out

    def any_bias(self) -> bool:
        """``model.bias``: whether a layer holds a bias that is not zero. Biases all zero (a model made or
        trained without them, as ``export`` writes ``bias=false``) are left out; where some layers have
        none (GPT-NeoX's attention_bias=false), ours get zeros."""
        return any(name.endswith(".bias") and p.any() for name, p in self.params.items())


def _named(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{key}": value for key, value in tensors.items()}


def _layernorm_eps(eps: float) -> float | None:
    """``model.norm_eps`` of a LayerNorm: None for torch's default 1e-5, as a trained checkpoint holds it."""
    return None if eps == 1e-5 else float(eps)


def _width(hidden: int, n_embd: int, activation: str) -> dict[str, Any]:
    """mlp_ratio for the feed-forward width ``hidden``, and mlp_hidden when the ratio alone does not give it."""
    ratio = hidden / n_embd * (1.5 if activation == "swiglu" else 1.0)
    return {"mlp_ratio": ratio} if hidden_width(n_embd, ratio, activation) == hidden else {"mlp_ratio": ratio, "mlp_hidden": hidden}


def _unrotate(rows: torch.Tensor, n_head: int, rotated: int) -> torch.Tensor:
    """Query or key rows (n_head·head_dim, ...) of transformers' rotary (``rotate_half``) in our order (pairs
    2i, 2i+1): the inverse of the order the export writes (:func:`hf_export.rotary_order`)."""
    head_dim = rows.shape[0] // n_head
    order = torch.argsort(rotary_order(head_dim, rotated))
    return rows.reshape(n_head, head_dim, *rows.shape[1:])[:, order].reshape(rows.shape)


def _gpt2(r: _Reader, block_size: int) -> tuple[dict, dict[str, torch.Tensor]]:
    c = r.config
    r.require("scale_attn_weights", True, "(no 1/sqrt(head size) in attention) has no lm-lightning counterpart")
    r.require("scale_attn_by_inverse_layer_idx", False, "has no lm-lightning counterpart")
    r.require("add_cross_attention", False, "(an encoder-decoder) has no lm-lightning counterpart")
    activation, bias = r.activation("activation_function"), r.any_bias()
    fields = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, **_width(c.n_inner or 4 * c.n_embd, c.n_embd, activation),
                  dropout=c.resid_pdrop, bias=bias, norm="layernorm", norm_eps=_layernorm_eps(c.layer_norm_epsilon),
                  activation=activation, position="learned")
    if block_size > c.n_positions:
        raise UserError(f"block_size={block_size} exceeds the {c.n_positions} learned positions of {r.folder}: "
                        f"pass block_size={c.n_positions} or less")
    state = {"wpe.weight": r.params["transformer.wpe.weight"][:block_size]}
    for i in range(c.n_layer):
        p = f"transformer.h.{i}"
        for theirs, ours in (("attn.c_attn", "attn.c_attn"), ("attn.c_proj", "attn.c_proj"),
                             ("mlp.c_fc", "mlp.c_fc"), ("mlp.c_proj", "mlp.c_proj")):
            state |= _named(f"h.{i}.{ours}", r.linear(f"{p}.{theirs}", bias, transpose=True))
        state |= _named(f"h.{i}.ln_1", r.linear(f"{p}.ln_1", bias)) | _named(f"h.{i}.ln_2", r.linear(f"{p}.ln_2", bias))
    return fields, state | _named("ln_f", r.linear("transformer.ln_f", bias))


def _gpt_neox(r: _Reader, block_size: int) -> tuple[dict, dict[str, torch.Tensor]]:
    c = r.config
    activation, bias = r.activation("hidden_act"), r.any_bias()
    fields = dict(n_layer=c.num_hidden_layers, n_head=c.num_attention_heads, n_embd=c.hidden_size,
                  **_width(c.intermediate_size, c.hidden_size, activation), dropout=c.hidden_dropout, bias=bias,
                  norm="layernorm", norm_eps=_layernorm_eps(c.layer_norm_eps), parallel_residual=bool(c.use_parallel_residual),
                  activation=activation, position="rope", **r.rope())
    n_head, head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    rotated = GPTConfig(vocab_size=1, block_size=block_size, **fields).rotary_dims()
    state = {}
    for i in range(c.num_hidden_layers):
        p = f"gpt_neox.layers.{i}"
        for name, tensor in r.linear(f"{p}.attention.query_key_value", bias).items():
            # GPT-NeoX: per head [q_h | k_h | v_h]; ours: [q | k | v], each head after head
            q, k, v = tensor.reshape(n_head, 3, head_dim, *tensor.shape[1:]).unbind(1)
            q, k, v = (t.reshape(n_head * head_dim, *tensor.shape[1:]) for t in (q, k, v))
            state[f"h.{i}.attn.c_attn.{name}"] = torch.cat([_unrotate(q, n_head, rotated), _unrotate(k, n_head, rotated), v])
        state |= _named(f"h.{i}.attn.c_proj", r.linear(f"{p}.attention.dense", bias))
        state |= _named(f"h.{i}.ln_1", r.linear(f"{p}.input_layernorm", bias))
        state |= _named(f"h.{i}.ln_2", r.linear(f"{p}.post_attention_layernorm", bias))
        state |= _named(f"h.{i}.mlp.c_fc", r.linear(f"{p}.mlp.dense_h_to_4h", bias))
        state |= _named(f"h.{i}.mlp.c_proj", r.linear(f"{p}.mlp.dense_4h_to_h", bias))
    return fields, state | _named("ln_f", r.linear("gpt_neox.final_layer_norm", bias))


def _llama(r: _Reader, block_size: int) -> tuple[dict, dict[str, torch.Tensor]]:
    c = r.config
    r.require("hidden_act", "silu", "has no lm-lightning counterpart: Llama imports with silu (model.activation=swiglu)")
    r.require("head_dim", c.hidden_size // c.num_attention_heads, "differs from hidden_size / num_attention_heads, "
              "which lm-lightning's model takes as the head size")
    rope = r.rope()
    if rope["rope_fraction"] != 1.0:  # transformers' Llama turns every feature of the head
        raise _refuse(r.folder, "rope_parameters.partial_rotary_factor", rope["rope_fraction"], "is not used by Llama")
    n_head, n_kv_head = c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads
    bias = r.any_bias()
    fields = dict(n_layer=c.num_hidden_layers, n_head=n_head, n_kv_head=None if n_kv_head == n_head else n_kv_head,
                  n_embd=c.hidden_size, **_width(c.intermediate_size, c.hidden_size, "swiglu"), dropout=c.attention_dropout, bias=bias, norm="rmsnorm",
                  norm_eps=c.rms_norm_eps, activation="swiglu", position="rope", rope_base=rope["rope_base"])
    head_dim = c.hidden_size // n_head
    state = {}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}.self_attn"
        q, k, v = (r.linear(f"{p}.{name}_proj", bias) for name in "qkv")
        for name in q:
            state[f"h.{i}.attn.c_attn.{name}"] = torch.cat(
                [_unrotate(q[name], n_head, head_dim), _unrotate(k[name], n_kv_head, head_dim), v[name]])
        state |= _named(f"h.{i}.attn.c_proj", r.linear(f"{p}.o_proj", bias))
        state |= _named(f"h.{i}.ln_1", r.linear(f"model.layers.{i}.input_layernorm", bias=False))
        state |= _named(f"h.{i}.ln_2", r.linear(f"model.layers.{i}.post_attention_layernorm", bias=False))
        # SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x)) = c_proj(silu(c_gate(x)) * c_fc(x))
        for theirs, ours in (("gate_proj", "c_gate"), ("up_proj", "c_fc"), ("down_proj", "c_proj")):
            state |= _named(f"h.{i}.mlp.{ours}", r.linear(f"model.layers.{i}.mlp.{theirs}", bias))
    return fields, state | _named("ln_f", r.linear("model.norm", bias=False))


_LAYOUTS = {"gpt2": (_gpt2, "n_positions"), "gpt_neox": (_gpt_neox, "max_position_embeddings"),
            "llama": (_llama, "max_position_embeddings")}


def load_hf_model(source: str | Path) -> PreTrainedModel:
    """The transformers causal LM in ``source`` (float32, eval mode); a one-line UserError for a folder
    that is not one, or holds another architecture."""
    transformers = transformers_module()
    folder = Path(source)
    if not (folder / "config.json").is_file():
        raise UserError(f"source={folder} is not a transformers model folder (no config.json): pass the folder "
                        "save_pretrained wrote")
    model_type = transformers.AutoConfig.from_pretrained(folder).model_type
    if model_type not in _LAYOUTS:
        raise UserError(f"source={folder} holds a {model_type} model: import reads "
                        f"{', '.join(ARCHITECTURES[t] for t in _LAYOUTS)} (config.json model_type {', '.join(_LAYOUTS)})")
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, weights_only=True).eval()


def to_gpt(hf: PreTrainedModel, folder: str | Path = "the model", block_size: int | None = None) -> GPT:
    """The GPT (float32, eval mode) that computes ``hf``'s logits, with a context of ``block_size``
    tokens (None: the model's maximum positions)."""
    reader = _Reader(hf, Path(folder))
    layout, positions = _LAYOUTS[hf.config.model_type]
    context = block_size or getattr(hf.config, positions)
    fields, state = layout(reader, context)
    tied = bool(getattr(hf.config, "tie_word_embeddings", False))
    config = GPTConfig(vocab_size=reader.embedding.shape[0], block_size=context, tie_embeddings=tied,
                       init_std=float(getattr(hf.config, "initializer_range", 0.02)), **fields)
    state["wte.weight"] = reader.embedding
    state["lm_head.weight"] = reader.embedding if tied else reader.head
    model = GPT(config)
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True)
    return model.eval()


def max_logit_difference(model: GPT, hf: PreTrainedModel, tokens: int = 64) -> tuple[float, int]:
    """Largest |logit| difference between ``model`` and ``hf`` on 2 × min(tokens, block_size) random ids,
    and the number of ids."""
    ids = torch.randint(model.config.vocab_size, (2, min(tokens, model.config.block_size)),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (hf(ids).logits - model(ids)).abs().max().item(), ids.numel()


def checkpoint_of(model: GPT, tokenizer_model: bytes, tokenizer_vocab: int) -> dict[str, Any]:
    """A Lightning checkpoint of :class:`LanguageModelTask` as ``lm-lightning train`` writes one at step 0:
    the GPT's config and the causal-LM objective as hyperparameters, the weights, the tokenizer bytes."""
    import lightning

    from lm_lightning.tasks.language_model import LanguageModelTask

    task = LanguageModelTask(model={"_target_": GPT_TARGET, **asdict(model.config)},
                             objective={"_target_": CAUSAL_LM_TARGET, "vocab_size": tokenizer_vocab},
                             tokenizer_model=tokenizer_model)
    task.model.load_state_dict(model.state_dict(), strict=True)
    return {"epoch": 0, "global_step": 0, "pytorch-lightning_version": lightning.__version__,
            "state_dict": task.state_dict(), "hparams_name": "kwargs", "hyper_parameters": dict(task.hparams),
            "tokenizer_model": tokenizer_model, "initial_loss": None}


def read_tokenizer(folder: Path):
    """The folder's tokenizer as lm-lightning loads it (its ``to_bytes()`` is what the checkpoint stores): an
    lm-lightning sentencepiece ``tokenizer.model`` (what ``export`` writes beside the tokenizer.json it converts
    from it), else ``tokenizer.json`` through HF ``tokenizers``, else the one transformers' ``AutoTokenizer``
    builds from the folder (e.g. from GPT-2's vocab.json and merges.txt)."""
    from lm_lightning.data.hf_tokenizer import HFTokenizer
    from lm_lightning.data.tokenizer import load_tokenizer

    if (folder / "tokenizer.model").is_file():
        try:
            return load_tokenizer(folder / "tokenizer.model")
        except (UserError, RuntimeError):  # another program's model (Llama 2's has no "\n" piece): its tokenizer.json
            pass
    if (folder / "tokenizer.json").is_file():
        return load_tokenizer(folder / "tokenizer.json")
    try:
        built = transformers_module().AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # transformers raises many kinds for a folder without tokenizer files
        raise UserError(f"source={folder} holds no tokenizer that transformers reads ({type(err).__name__}): "
                        "save the model's tokenizer into it (tokenizer.save_pretrained)") from None
    return HFTokenizer.from_bytes(built.backend_tokenizer.to_str().encode("utf-8"))


def import_from_hf(source: str | Path, out: str | Path, block_size: int | None = None, overwrite: bool = False,
                   verify: bool = True) -> Path:
    """Writes the model and tokenizer of the transformers folder ``source`` as the checkpoint ``out``
    (with the ``.sha256`` sidecar ``train`` writes). ``block_size``: the context (None: the model's
    maximum positions). ``verify``: compare both models' logits on 2 × min(64, block_size) random tokens
    (at most 1e-4 apart). Nothing is written when the folder or ``out`` is refused."""
    import io

    from lm_lightning.training.checkpoint_io import write_checkpoint_file

    folder, path = Path(source), Path(out)
    if path.exists() and (path.is_dir() or not overwrite):
        raise UserError(f"out={path} exists: pass another out, or overwrite=true")
    if block_size is not None and block_size <= 0:
        raise UserError(f"block_size={block_size} must be a positive number of tokens (or null: the model's own)")
    hf = load_hf_model(folder)
    tokenizer = read_tokenizer(folder)
    model = to_gpt(hf, folder, block_size)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"the tokenizer of {folder} has {tokenizer.vocab_size} tokens but the model only "
                        f"{model.config.vocab_size} embedding rows: pass a folder whose tokenizer fits its model")
    report = f"imported {folder} ({type(hf).__name__}) to {path}"
    if verify:
        difference, n = max_logit_difference(model, hf)
        if difference > TOLERANCE:
            raise RuntimeError(f"the imported model's logits differ from transformers' by {difference:.2e} "
                               f"(> {TOLERANCE}): a bug in lm_lightning/interop/hf_import.py's {hf.config.model_type} layout")
        report += f" | max |logit difference| {difference:.1e} on {n} tokens"
    buffer = io.BytesIO()
    torch.save(checkpoint_of(model, tokenizer.to_bytes(), tokenizer.vocab_size), buffer)
    write_checkpoint_file(buffer.getvalue(), path)
    params = model.parameter_count()
    print(f"{report} | {params.total:,} parameters, context {model.config.block_size}, vocabulary "
          f"{model.config.vocab_size} | tokenizer {type(tokenizer).__name__} ({tokenizer.vocab_size} tokens)", flush=True)
    return path
