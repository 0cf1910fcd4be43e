"""Export to Hugging Face transformers: each supported GPT configuration loads with
``AutoModelForCausalLM`` and gives the platform's logits within 1e-4, the tokenizer loads with
``AutoTokenizer`` and gives our ids, and what cannot be exported is refused with one line."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import SHARED_DATA, run_in_process

transformers = pytest.importorskip("transformers")  # the [hf] extra, installed by [test]

from lm_lightning.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from lm_lightning.errors import UserError  # noqa: E402
from lm_lightning.interop.hf_export import export_to_hf, save_hf, target_architecture  # noqa: E402
from lm_lightning.models.gpt import GPT, GPTConfig  # noqa: E402
from lm_lightning.models.recurrent import RecurrentConfig, RecurrentLM  # noqa: E402

V, T = 97, 40  # vocabulary and context of the tiny models
LLAMA = {"position": "rope", "norm": "rmsnorm", "activation": "swiglu"}


def tiny_gpt(seed: int = 0, **options) -> GPT:
    """A 2-layer GPT with every parameter (norm weights and biases too) moved well off its init, so a
    misplaced tensor shows up in the logits, which span several units."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=2, n_head=4, n_embd=32, **options))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.mark.parametrize(
    "options, architecture",
    [
        ({"position": "learned", "bias": True}, "GPT2LMHeadModel"),
        ({"position": "learned", "bias": False, "tie_embeddings": False, "activation": "relu"}, "GPT2LMHeadModel"),
        ({"position": "sinusoidal"}, "GPT2LMHeadModel"),
        ({"position": "none", "bias": False}, "GPT2LMHeadModel"),
        ({"position": "rope", "bias": False}, "GPTNeoXForCausalLM"),
        ({"position": "rope", "bias": True, "tie_embeddings": False, "rope_base": 500.0}, "GPTNeoXForCausalLM"),
        ({**LLAMA, "bias": False}, "LlamaForCausalLM"),
        ({**LLAMA, "bias": True, "tie_embeddings": False, "rope_base": 500.0}, "LlamaForCausalLM"),
    ],
)
def test_exported_model_loads_with_transformers_and_gives_our_logits(tmp_path, options, architecture):
    model = tiny_gpt(**options)
    save_hf(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == architecture
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == V
    ids = torch.randint(V, (2, T), generator=torch.Generator().manual_seed(1))  # the whole context: every position
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.std() > 1.0
    assert (theirs - ours).abs().max().item() < 1e-4
    # causal in both: the first half's logits do not change when only the first half is fed
    with torch.no_grad():
        assert (hf(ids[:, : T // 2]).logits - ours[:, : T // 2]).abs().max().item() < 1e-4


def test_greedy_generation_with_transformers_cache_continues_as_ours(tmp_path):
    from lm_lightning.generation import generate

    model = tiny_gpt(**LLAMA)
    save_hf(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = torch.randint(V, (1, 8), generator=torch.Generator().manual_seed(2))
    ours = generate(model, prompt, max_new_tokens=12, temperature=0.0)
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert theirs.tolist() == ours.tolist()


@pytest.mark.parametrize(
    "options, named",
    [
        ({"position": "alibi"}, "model.position=alibi"),
        ({"position": "t5"}, "model.position=t5"),
        ({"norm_position": "post"}, "model.norm_position=post"),
        ({"n_experts": 4}, "model.n_experts=4 (Mixture of Experts)"),
        ({"family": "prefix_lm"}, "model.family=prefix_lm"),
        ({"position": "rope", "norm": "rmsnorm", "activation": "gelu"}, "model.position=rope with norm=rmsnorm, activation=gelu"),
        ({"position": "learned", "activation": "swiglu"}, "model.position=learned with norm=layernorm, activation=swiglu"),
        ({"parametrization": "mup", "tie_embeddings": False, "mup_base_width": 16},
         "model.parametrization=mup at a width multiplier of 2"),
    ],
)
def test_a_configuration_without_an_exact_counterpart_is_refused_in_one_line_before_writing(tmp_path, options, named):
    out = tmp_path / "hf"
    with pytest.raises(UserError) as err:
        save_hf(tiny_gpt(**options), out)
    message = str(err.value)
    assert message.startswith(f"cannot export {named} to transformers: supported:") and "\n" not in message
    assert not out.exists()


def test_target_architecture_of_the_default_model_configs():
    assert target_architecture(GPTConfig(vocab_size=V)) == "gpt2"  # conf/model/gpt.yaml: learned, layernorm, gelu
    assert target_architecture(GPTConfig(vocab_size=V, position="rope")) == "gpt_neox"
    assert target_architecture(GPTConfig(vocab_size=V, **LLAMA)) == "llama"


# --- tokenizer ----------------------------------------------------------------------------------

SAMPLES = ["", "hello", "To be, or not to be: that is the question.", "  two leading spaces", "trailing  ", "a▁b ▁",
           "a\nb\n\nc\n", "\n", "tabs\tand   runs    of spaces", "ünïcödé € 😀 and 中文", "x  y   z",
           "<s> literal </s> <unk> <pad>", "   ", "qzxv jjjkkk", "ROMEO:\nWhat light through yonder window breaks?"]


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return (SHARED_DATA / "tinyshakespeare" / "input.txt").read_text()


@pytest.mark.parametrize("kind, byte_fallback", [(kind, fallback) for kind in ("bpe", "unigram", "char")
                                                  for fallback in (True, False)] + [("byte", True)])
def test_auto_tokenizer_encodes_and_decodes_as_our_tokenizer(tmp_path, shakespeare, kind, byte_fallback):
    # "<", "/" and ">" are in the vocabulary, as in any corpus with code: a unigram model reads a literal "<s>"
    # as <s> only when one of its characters has no piece (see lm_lightning.interop.hf_export.hf_tokenizer)
    docs = shakespeare[:200_000].split("\n\n") + ["if a < b and b > c: return a / c"] * 20
    path = train_tokenizer(docs, {"type": kind, "vocab_size": 400, "byte_fallback": byte_fallback, "num_threads": 1,
                                  "verbose": False, "character_coverage": 1.0}, tmp_path / "spm")
    ours = Tokenizer.load(path, num_threads=1)
    model = GPT(GPTConfig(vocab_size=ours.vocab_size, block_size=T, n_layer=1, n_head=2, n_embd=16))
    save_hf(model, tmp_path / "hf", tokenizer_model=path.read_bytes())
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    held_out = shakespeare[-30_000:].split("\n")
    texts = SAMPLES + ["\n".join(held_out[i : i + 12]) for i in range(0, len(held_out), 12)]
    for text in texts:
        ids = ours.encode(text)
        assert theirs.encode(text) == ids, text  # no BOS/EOS added, "<s>" in text is characters
        assert theirs.decode(ids) == ours.decode(ids), text
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == path.read_bytes()


def test_a_word_tokenizer_ships_as_tokenizer_model_only(tmp_path, shakespeare):
    path = train_tokenizer(shakespeare[:100_000].split("\n\n"), {"type": "word", "vocab_size": 1000, "num_threads": 1,
                                                                 "verbose": False}, tmp_path / "spm")
    model = GPT(GPTConfig(vocab_size=Tokenizer.load(path).vocab_size, block_size=T, n_layer=1, n_head=2, n_embd=16))
    save_hf(model, tmp_path / "hf", tokenizer_model=path.read_bytes())
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == path.read_bytes()
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.eos_token_id == 3


# --- from a checkpoint ---------------------------------------------------------------------------


def test_export_command_on_a_trained_checkpoint_end_to_end(tmp_path, tiny_checkpoint):
    ckpt, out = tiny_checkpoint, tmp_path / "hf"
    proc = run_in_process("export", f"ckpt_path={ckpt}", f"out_dir={out}", "num_threads=1", cwd=tmp_path,
                          cache=tmp_path / "cache")
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith(f"exported {ckpt} to {out} as GPT2LMHeadModel | max |logit difference| ")
    assert float(line.split("max |logit difference| ")[1].split()[0]) < 1e-4
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]

    from lm_lightning.training.loading import load_trained

    task, tokenizer = load_trained(str(ckpt))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    text = "ROMEO:\nWhat light, Juliet?"
    ids = hf_tokenizer(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == tokenizer.encode(text)
    with torch.no_grad():
        assert (hf_model(ids).logits - task.model(ids)).abs().max().item() < 1e-4

    with pytest.raises(UserError, match=f"out_dir={out} exists and is not an empty folder"):
        export_to_hf(ckpt, out)
    (out / "config.json").write_text("{}")
    export_to_hf(ckpt, out, overwrite=True, verify=False)
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"


def test_a_missing_checkpoint_is_one_user_error(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found: .*nope.ckpt"):
        export_to_hf(tmp_path / "nope.ckpt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_checkpoint_of_another_family_is_refused(tmp_path, monkeypatch):
    lstm = RecurrentLM(RecurrentConfig(vocab_size=V, family="lstm", n_layer=1, n_embd=8))
    task = SimpleNamespace(model=lstm, hparams={"model": {"family": "lstm"}}, tokenizer_model=b"")
    monkeypatch.setattr("lm_lightning.interop.hf_export.load_trained", lambda path: (task, None))
    with pytest.raises(UserError, match="holds a lstm model: only model=gpt exports to transformers"):
        export_to_hf(Path("lstm.ckpt"), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
