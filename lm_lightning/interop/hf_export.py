"""A trained GPT as a Hugging Face ``transformers`` folder (``config.json``, ``model.safetensors``, the tokenizer) that
``AutoModelForCausalLM.from_pretrained(out_dir)`` loads and runs with the platform's logits.

Each exportable GPT configuration computes exactly what one transformers architecture computes
(all of them pre-norm, dense, ``family=gpt``):

| ``model.position`` | ``model.norm`` | ``model.activation`` | transformers class |
|---|---|---|---|
| learned, sinusoidal, none | layernorm | gelu, gelu_tanh, relu | ``GPT2LMHeadModel`` (the sinusoid table, or zeros, as ``wpe``) |
| rope | layernorm | gelu, gelu_tanh, relu | ``GPTNeoXForCausalLM`` (``parallel_residual``, ``rope_fraction`` as its own) |
| rope | rmsnorm | swiglu | ``LlamaForCausalLM`` (``n_kv_head`` as grouped-query attention) |

Anything else (ALiBi or T5 positions, post-norm, Mixture of Experts, other families) has no exact
counterpart and is refused with one line. Biases the GPT does not have are written as zeros where
the transformers layer always has one (GPT-2, GPT-NeoX). The sentencepiece tokenizer goes along as
``tokenizer.model`` and, for bpe, unigram and char models, as a ``tokenizer.json`` that
``AutoTokenizer`` loads and that encodes text to our ids (see :func:`hf_tokenizer`). A tokenizer of
HF ``tokenizers`` (byte_bpe, words, hf) goes as its own ``tokenizer.json``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lm_lightning.data.tokenizer import is_tokenizer_json, load_tokenizer
from lm_lightning.errors import UserError
from lm_lightning.models.capabilities import reads_left_to_right
from lm_lightning.models.gpt import GPT, GPTConfig
from lm_lightning.training.loading import load_trained

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    from lm_lightning.data.hf_tokenizer import HFTokenizer

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM"}
SUPPORTED = ("supported: model.position=learned|sinusoidal|none with norm=layernorm, activation=gelu|gelu_tanh|relu "
             "(GPT-2); position=rope with norm=layernorm, activation=gelu|gelu_tanh|relu (GPT-NeoX) or norm=rmsnorm, "
             "activation=swiglu (Llama); all with norm_position=pre and n_experts=0; parallel_residual and "
             "rope_fraction < 1 with GPT-NeoX only, n_kv_head with Llama only")
HF_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "gelu_tanh": "gelu_pytorch_tanh"}  # ours -> transformers' exact one
TOLERANCE = 1e-4  # largest |logit difference| the exported model may show against the checkpoint (float32)
_SPM_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}  # sentencepiece TrainerSpec.ModelType
_NORMAL, _USER_DEFINED = 1, 4  # sentencepiece piece types: learned pieces; "\n" and tokenizer.special_tokens


def target_architecture(config: GPTConfig) -> str:
    """``gpt2``, ``gpt_neox`` or ``llama``: the transformers model type that computes exactly what
    ``config`` does; a one-line UserError naming the option that has no counterpart otherwise."""
    c, unsupported = config, None
    if not reads_left_to_right(GPT.families[c.family]):  # transformers' causal LMs have no bidirectional prefix
        unsupported = f"model.family={c.family}"
    elif c.position not in ("learned", "sinusoidal", "none", "rope"):
        unsupported = f"model.position={c.position}"
    elif c.norm_position != "pre":
        unsupported = f"model.norm_position={c.norm_position}"
    elif c.n_experts:
        unsupported = f"model.n_experts={c.n_experts} (Mixture of Experts)"
    elif c.parametrization == "mup" and c.width_multiplier() != 1.0:  # no place for the output multiplier or 1/d_head
        unsupported = f"model.parametrization=mup at a width multiplier of {c.width_multiplier():g}"
    elif c.position != "rope" and c.norm == "layernorm" and c.activation in HF_ACTIVATIONS:
        arch = "gpt2"
    elif c.position == "rope" and c.norm == "layernorm" and c.activation in HF_ACTIVATIONS:
        arch = "gpt_neox"
    elif c.position == "rope" and c.norm == "rmsnorm" and c.activation == "swiglu":
        arch = "llama"
    else:
        unsupported = f"model.position={c.position} with norm={c.norm}, activation={c.activation}"
    if unsupported is None:  # options that one architecture only has
        if c.parallel_residual and arch != "gpt_neox":
            unsupported = f"model.parallel_residual=true with {ARCHITECTURES[arch]}"
        elif c.rope_fraction != 1.0 and arch == "llama":
            unsupported = f"model.rope_fraction={c.rope_fraction} with {ARCHITECTURES[arch]}"
        elif (c.n_kv_head or c.n_head) != c.n_head and arch != "llama":
            unsupported = f"model.n_kv_head={c.n_kv_head} with {ARCHITECTURES[arch]}"
        else:
            return arch
    raise UserError(f"cannot export {unsupported} to transformers: {SUPPORTED}")


def _params(prefix: str, module: nn.Module, bias: bool, transpose: bool = False) -> dict[str, torch.Tensor]:
    """``<prefix>.weight`` and, when ``bias``, ``<prefix>.bias``: the module's own, or zeros where the
    target layer always has a bias and ours has none. ``transpose``: GPT-2's Conv1D stores (in, out)."""
    weight = module.weight
    out = {f"{prefix}.weight": weight.t() if transpose else weight}
    if bias:
        own = getattr(module, "bias", None)
        out[f"{prefix}.bias"] = own if own is not None else weight.new_zeros(weight.shape[0])
    return out


def rotary_order(head_dim: int, rotated: int) -> torch.Tensor:
    """Rows of one head in transformers' rotary order: ours turns the pairs (2i, 2i+1) of the first ``rotated``
    features, transformers' ``rotate_half`` the pairs (i, i + rotated/2), both by the angle of frequency i.
    Rows [0, 2, 4, ..., 1, 3, 5, ...] of the rotated features make one the other; the rest keep their place."""
    return torch.cat([torch.arange(0, rotated, 2), torch.arange(1, rotated, 2), torch.arange(rotated, head_dim)])


def _half_rotation(rows: torch.Tensor, n_head: int, rotated: int | None = None) -> torch.Tensor:
    """Query or key rows (n_head·head_dim, ...) reordered within each head for transformers' rotary
    (:func:`rotary_order`); queries and keys get the same order, so every attention score q·k is unchanged."""
    head_dim = rows.shape[0] // n_head
    order = rotary_order(head_dim, rotated or head_dim)
    return rows.reshape(n_head, head_dim, *rows.shape[1:])[:, order].reshape(rows.shape)


def _gpt2(model: GPT) -> tuple[dict, dict[str, torch.Tensor]]:
    c = model.config
    if c.position == "learned":
        positions = model.wpe.weight
    elif c.position == "sinusoidal":
        positions = model.sinusoid  # a fixed table added to the embeddings is a learned table that was not trained
    else:
        positions = model.wte.weight.new_zeros(c.block_size, c.n_embd)
    config = dict(n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                  n_inner=model.h[0].mlp.c_fc.out_features,
                  activation_function=HF_ACTIVATIONS[c.activation],  # "gelu" is F.gelu's exact erf GELU
                  layer_norm_epsilon=model.ln_f.eps, resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout)
    state = {"transformer.wte.weight": model.wte.weight, "transformer.wpe.weight": positions}
    for i, block in enumerate(model.h):
        p = f"transformer.h.{i}"
        state |= _params(f"{p}.ln_1", block.ln_1, bias=True) | _params(f"{p}.ln_2", block.ln_2, bias=True)
        state |= _params(f"{p}.attn.c_attn", block.attn.c_attn, bias=True, transpose=True)
        state |= _params(f"{p}.attn.c_proj", block.attn.c_proj, bias=True, transpose=True)
        state |= _params(f"{p}.mlp.c_fc", block.mlp.c_fc, bias=True, transpose=True)
        state |= _params(f"{p}.mlp.c_proj", block.mlp.c_proj, bias=True, transpose=True)
    return config, state | _params("transformer.ln_f", model.ln_f, bias=True)


def _gpt_neox(model: GPT) -> tuple[dict, dict[str, torch.Tensor]]:
    c = model.config
    head_dim = c.n_embd // c.n_head
    config = dict(hidden_size=c.n_embd, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                  intermediate_size=model.h[0].mlp.c_fc.out_features, hidden_act=HF_ACTIVATIONS[c.activation],
                  max_position_embeddings=c.block_size, layer_norm_eps=model.ln_f.eps, attention_bias=c.bias,
                  use_parallel_residual=c.parallel_residual,
                  rope_parameters={"rope_type": "default", "rope_theta": c.rope_base,
                                   "partial_rotary_factor": c.rope_fraction},  # int(head_dim · factor), as ours
                  attention_dropout=c.dropout, hidden_dropout=c.dropout)
    state = {"gpt_neox.embed_in.weight": model.wte.weight}
    for i, block in enumerate(model.h):
        p = f"gpt_neox.layers.{i}"
        qkv = _params("qkv", block.attn.c_attn, bias=c.bias)
        for name, tensor in qkv.items():
            # ours: rows [q | k | v], each head-major; GPT-NeoX: per head [q_h | k_h | v_h]
            q, k, v = tensor.chunk(3)
            q, k = _half_rotation(q, c.n_head, c.rotary_dims()), _half_rotation(k, c.n_head, c.rotary_dims())
            per_head = torch.stack([t.reshape(c.n_head, head_dim, *t.shape[1:]) for t in (q, k, v)], dim=1)
            state[f"{p}.attention.query_key_value.{name.split('.')[1]}"] = per_head.reshape(tensor.shape)
        state |= _params(f"{p}.attention.dense", block.attn.c_proj, bias=c.bias)
        state |= _params(f"{p}.input_layernorm", block.ln_1, bias=True)
        state |= _params(f"{p}.post_attention_layernorm", block.ln_2, bias=True)
        state |= _params(f"{p}.mlp.dense_h_to_4h", block.mlp.c_fc, bias=True)
        state |= _params(f"{p}.mlp.dense_4h_to_h", block.mlp.c_proj, bias=True)
    return config, state | _params("gpt_neox.final_layer_norm", model.ln_f, bias=True)


def _llama(model: GPT) -> tuple[dict, dict[str, torch.Tensor]]:
    c = model.config
    # nn.RMSNorm(eps=None) uses the machine epsilon of the input's dtype; the export is float32's
    eps = model.ln_f.eps if model.ln_f.eps is not None else torch.finfo(torch.float32).eps
    config = dict(hidden_size=c.n_embd, intermediate_size=model.h[0].mlp.c_fc.out_features,
                  num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head or c.n_head,
                  head_dim=c.n_embd // c.n_head, hidden_act="silu", max_position_embeddings=c.block_size,
                  rms_norm_eps=eps, rope_parameters={"rope_type": "default", "rope_theta": c.rope_base},
                  attention_bias=c.bias, mlp_bias=c.bias, attention_dropout=c.dropout)
    state = {"model.embed_tokens.weight": model.wte.weight}
    for i, block in enumerate(model.h):
        p = f"model.layers.{i}"
        kv = (c.n_kv_head or c.n_head) * (c.n_embd // c.n_head)
        for name, tensor in _params("qkv", block.attn.c_attn, bias=c.bias).items():
            q, k, v = tensor.split([c.n_embd, kv, kv])
            suffix = name.split(".")[1]
            state[f"{p}.self_attn.q_proj.{suffix}"] = _half_rotation(q, c.n_head)
            state[f"{p}.self_attn.k_proj.{suffix}"] = _half_rotation(k, c.n_kv_head or c.n_head)
            state[f"{p}.self_attn.v_proj.{suffix}"] = v
        state |= _params(f"{p}.self_attn.o_proj", block.attn.c_proj, bias=c.bias)
        state |= _params(f"{p}.input_layernorm", block.ln_1, bias=False)
        state |= _params(f"{p}.post_attention_layernorm", block.ln_2, bias=False)
        # SwiGLU: c_proj(silu(c_gate(x)) * c_fc(x)) = down_proj(silu(gate_proj(x)) * up_proj(x))
        state |= _params(f"{p}.mlp.gate_proj", block.mlp.c_gate, bias=c.bias)
        state |= _params(f"{p}.mlp.up_proj", block.mlp.c_fc, bias=c.bias)
        state |= _params(f"{p}.mlp.down_proj", block.mlp.c_proj, bias=c.bias)
    return config, state | _params("model.norm", model.ln_f, bias=False)


_LAYOUTS = {"gpt2": _gpt2, "gpt_neox": _gpt_neox, "llama": _llama}


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise UserError("lm-lightning export needs transformers and safetensors: pip install -e \".[hf]\"") from None
    return transformers


def to_transformers(model: GPT, special_ids: dict[str, int | None] | None = None) -> PreTrainedModel:
    """The transformers causal LM (eval mode, the GPT's dtype) holding ``model``'s weights.

    ``special_ids``: ``bos_token_id``, ``eos_token_id`` and ``pad_token_id`` for its config (None: unset).
    """
    arch = target_architecture(model.config)
    transformers = transformers_module()
    layout, state = _LAYOUTS[arch](model)
    state["lm_head.weight"] = model.lm_head.weight  # the same tensor as the embedding when tied
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **(special_ids or {})}
    config = transformers.AutoConfig.for_model(
        arch, vocab_size=model.config.vocab_size, tie_word_embeddings=model.config.tie_embeddings,
        initializer_range=model.config.init_std, architectures=[ARCHITECTURES[arch]], **ids, **layout)
    hf = transformers.AutoModelForCausalLM.from_config(config).to(model.wte.weight.dtype)
    hf.load_state_dict({k: v.detach().contiguous() for k, v in state.items()}, strict=True)
    return hf.eval()


def hf_tokenizer(model_proto: bytes, max_length: int) -> PreTrainedTokenizerFast | None:
    """A transformers tokenizer that encodes text to the ids our :class:`Tokenizer` gives, or None for
    a ``word`` model (its whole-word unknowns and byte fallback have no ``tokenizers`` model) and for
    a model that normalises text (``train_tokenizer`` never writes one).

    Built from the sentencepiece model itself: spaces become ``▁`` (identity normalisation, no dummy
    prefix), BPE merges are ranked by piece score, unigram keeps its scores, a char model is BPE
    without merges; ``"\\n"`` and other user-defined pieces are whole tokens, as sentencepiece emits
    them; no BOS/EOS is added, and text such as ``"<s>"`` is read as characters (``split_special_tokens``),
    except by a unigram model when one of its characters has no piece. ``decode`` gives our text for
    ids without control tokens (transformers writes ``<s>`` and ``</s>`` unless ``skip_special_tokens``).
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    proto = sentencepiece_model_pb2.ModelProto.FromString(model_proto)
    kind, normalizer = _SPM_TYPES[proto.trainer_spec.model_type], proto.normalizer_spec
    if kind == "word" or normalizer.add_dummy_prefix or normalizer.remove_extra_whitespaces \
            or normalizer.precompiled_charsmap:
        return None
    spec = proto.trainer_spec
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    if kind == "unigram":
        # sentencepiece matches only normal and user-defined pieces in the text, transformers every piece:
        # control, unknown and byte pieces get a score no segmentation affords, so "<s>" or "<0x41>" in the
        # text stays characters. transformers puts <unk> 10 below the lowest score, so a literal "<s>" with
        # a character that has no piece (<unk> either way) is still read as <s>: the one difference left.
        never = -1e9
        scored = [(piece, score if piece_type in (_NORMAL, _USER_DEFINED) else never) for piece, score, piece_type in pieces]
        model = models.Unigram(scored, unk_id=spec.unk_id, byte_fallback=spec.byte_fallback)
    else:
        model = models.BPE(vocab={piece: i for i, (piece, _, _) in enumerate(pieces)},
                           merges=_bpe_merges(pieces) if kind == "bpe" else [],  # char: every character alone
                           unk_token=pieces[spec.unk_id][0], fuse_unk=True, byte_fallback=spec.byte_fallback)
    tokenizer = Tokenizer(model)
    escaped = normalizer.escape_whitespaces  # off for tokenizer=byte: a space is the byte 0x20, "▁" is three bytes
    if escaped:
        tokenizer.normalizer = normalizers.Replace(" ", "▁")
    unk = pieces[spec.unk_id][0]
    tokenizer.decoder = decoders.Sequence([
        decoders.Replace(unk, spec.unk_surface),  # sentencepiece writes <unk> as " ⁇ "
        *([decoders.Replace("▁", " ")] if escaped else []), *([decoders.ByteFallback()] if spec.byte_fallback else []),
        decoders.Fuse()])
    tokenizer.add_tokens([AddedToken(piece, normalized=False, special=False)
                          for piece, _, piece_type in pieces if piece_type == _USER_DEFINED])
    named = {f"{name}_token": pieces[i][0] for name, i in
             (("unk", spec.unk_id), ("bos", spec.bos_id), ("eos", spec.eos_id), ("pad", spec.pad_id)) if i >= 0}
    return transformers_module().PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, split_special_tokens=True, model_max_length=max_length, **named)


def _bpe_merges(pieces: list[tuple[str, float, int]]) -> list[tuple[str, str]]:
    """Every (left, right) split of a normal piece into two normal pieces, best piece score first:
    sentencepiece's BPE merges the adjacent pair whose union scores highest, leftmost on a tie."""
    normal = {piece: (score, i) for i, (piece, score, piece_type) in enumerate(pieces) if piece_type == _NORMAL}
    ranked = sorted((-score, i, piece[:cut], piece[cut:]) for piece, (score, i) in normal.items()
                    for cut in range(1, len(piece)) if piece[:cut] in normal and piece[cut:] in normal)
    return [(left, right) for _, _, left, right in ranked]


def tokenizers_tokenizer(tokenizer: HFTokenizer, max_length: int) -> PreTrainedTokenizerFast:
    """A transformers tokenizer over a ``tokenizers`` one, with its roles named; control tokens in the
    text are read as characters (``split_special_tokens``), as :class:`HFTokenizer` reads them."""
    from tokenizers import Tokenizer

    named = {f"{role}_token": tokenizer.id_to_token(i) for role, i in
             (("unk", tokenizer.unk_id), ("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("pad", tokenizer.pad_id))
             if i >= 0}
    return transformers_module().PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer.to_bytes().decode("utf-8")), split_special_tokens=True,
        model_max_length=max_length, **named)


def special_token_ids(model_proto: bytes | None) -> dict[str, int | None]:
    """BOS, EOS and padding ids of a sentencepiece model or a tokenizer.json, as transformers config fields."""
    if model_proto is None:
        return {}
    if is_tokenizer_json(model_proto):
        tokenizer = load_tokenizer(model_proto)
        return {f"{name}_token_id": (i if i >= 0 else None)
                for name, i in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("pad", tokenizer.pad_id))}
    from sentencepiece import sentencepiece_model_pb2

    spec = sentencepiece_model_pb2.ModelProto.FromString(model_proto).trainer_spec
    return {f"{name}_token_id": (i if i >= 0 else None)
            for name, i in (("bos", spec.bos_id), ("eos", spec.eos_id), ("pad", spec.pad_id))}


def save_hf(model: GPT, out_dir: str | Path, tokenizer_model: bytes | None = None) -> Path:
    """Writes ``model`` (and its tokenizer, when given) as a transformers folder: config.json,
    model.safetensors, generation_config.json; for a sentencepiece tokenizer, tokenizer.model plus,
    except for a ``word`` model, tokenizer.json and tokenizer_config.json for ``AutoTokenizer``; for a
    tokenizer.json, it and tokenizer_config.json."""
    hf = to_transformers(model, special_token_ids(tokenizer_model))  # refuses an unsupported model before writing
    folder = Path(out_dir)
    hf.save_pretrained(folder)
    if tokenizer_model is not None and is_tokenizer_json(tokenizer_model):
        tokenizers_tokenizer(load_tokenizer(tokenizer_model), model.config.block_size).save_pretrained(folder)
    elif tokenizer_model is not None:
        (folder / "tokenizer.model").write_bytes(tokenizer_model)
        tokenizer = hf_tokenizer(tokenizer_model, model.config.block_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    return folder


def max_logit_difference(model: GPT, folder: str | Path, ids: torch.Tensor) -> float:
    """Largest |logit| difference between ``model`` and the folder loaded by
    ``AutoModelForCausalLM.from_pretrained``, both in float32, on token ids (B, T)."""
    hf = transformers_module().AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = model if model.wte.weight.dtype == torch.float32 else copy.deepcopy(model).float()
    with torch.no_grad():
        return (hf(ids).logits - ours.eval()(ids)).abs().max().item()


def export_to_hf(ckpt_path: str | Path, out_dir: str | Path, overwrite: bool = False, verify: bool = True) -> Path:
    """Exports the GPT of an ``lm-lightning train`` checkpoint to ``out_dir`` (see :func:`save_hf`).

    ``verify``: reload the folder with transformers and check its logits on 2 × min(64, block_size)
    random tokens against the checkpoint's (at most 1e-4 apart). Nothing is written when the
    checkpoint, its model or ``out_dir`` is refused.
    """
    task, _ = load_trained(str(ckpt_path))
    model = task.model
    if not isinstance(model, GPT):
        family = (task.hparams.get("model") or {}).get("family", type(model).__name__)
        raise UserError(f"checkpoint {ckpt_path} holds a {family} model: only model=gpt exports to transformers")
    arch = target_architecture(model.config)
    transformers_module()
    folder = Path(out_dir)
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not overwrite)):
        raise UserError(f"out_dir={folder} exists and is not an empty folder: pass another out_dir, or overwrite=true")
    save_hf(model, folder, task.tokenizer_model)
    report = f"exported {ckpt_path} to {folder} as {ARCHITECTURES[arch]}"
    if verify:
        ids = torch.randint(model.config.vocab_size, (2, min(64, model.config.block_size)),
                            generator=torch.Generator().manual_seed(0))
        difference = max_logit_difference(model, folder, ids)
        if difference > TOLERANCE:
            raise RuntimeError(f"the exported model's logits differ from the checkpoint's by {difference:.2e} "
                               f"(> {TOLERANCE}): a bug in lm_lightning/interop/hf_export.py's {arch} layout")
        report += f" | max |logit difference| {difference:.1e} on {ids.numel()} tokens"
    tokenizer = " + ".join(name for name in ("tokenizer.json", "tokenizer.model") if (folder / name).exists())
    print(f"{report} | {tokenizer or 'no tokenizer'}", flush=True)
    return folder
