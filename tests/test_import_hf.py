"""Import from Hugging Face transformers: a GPT-2, GPT-NeoX or Llama folder made here (random weights, a
byte-level BPE tokenizer.json trained here, no download) becomes a checkpoint whose model gives transformers'
logits within 1e-4, whose tokenizer gives the folder's ids, that exports back to the same logits and that
``train init_from=`` continues; what has no exact counterpart is refused in one line naming the config field."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import SHARED_DATA, run_in_process

transformers = pytest.importorskip("transformers")  # the [hf] extra, installed by [test]

from lm_lightning.errors import UserError  # noqa: E402
from lm_lightning.interop.hf_export import export_to_hf, save_hf  # noqa: E402
from lm_lightning.interop.hf_import import import_from_hf  # noqa: E402
from lm_lightning.models.gpt import GPT, GPTConfig  # noqa: E402
from lm_lightning.training.loading import load_trained  # noqa: E402

T = 24  # context of the tiny models
TEXT = "ROMEO:\nBut soft, what light through yonder window breaks? 😀 ünï"


@pytest.fixture(scope="module")
def hf_tokenizer():
    """A byte-level BPE of 300 tokens trained on 50 kB of Tiny Shakespeare (GPT-2's kind of tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = (SHARED_DATA / "tinyshakespeare" / "input.txt").read_text()[:50_000]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(text.split("\n\n"), trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


SMALL = {"vocab_size": 300, "bos_token_id": 0, "eos_token_id": 0}
GPT2 = {"n_positions": T, "n_embd": 32, "n_layer": 2, "n_head": 4}
NEOX = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 80,
        "max_position_embeddings": T}
LLAMA = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 56,
         "max_position_embeddings": T}
ROPE = {"rope_type": "default", "rope_theta": 500.0}
CASES = {
    # GPT-2's defaults: gelu_new, 4x MLP, tied head
    "gpt2": ("GPT2Config", GPT2, {"position": "learned", "activation": "gelu_tanh", "tie_embeddings": True, "bias": True}),
    "gpt2 relu, n_inner, untied": ("GPT2Config", {**GPT2, "activation_function": "relu", "n_inner": 40,
                                                  "tie_word_embeddings": False, "layer_norm_epsilon": 1e-3},
                                   {"mlp_ratio": 1.25, "norm_eps": 1e-3, "tie_embeddings": False}),
    # Pythia's: parallel residual, rotary on a quarter of each head, untied embed_out
    "gpt_neox": ("GPTNeoXConfig", {**NEOX, "rope_parameters": {**ROPE, "partial_rotary_factor": 0.25}},
                 {"position": "rope", "parallel_residual": True, "rope_fraction": 0.25, "rope_base": 500.0,
                  "tie_embeddings": False}),
    "gpt_neox sequential, full rotary, tied": ("GPTNeoXConfig", {**NEOX, "num_attention_heads": 4, "use_parallel_residual": False,
                                                                 "hidden_act": "gelu_new", "tie_word_embeddings": True,
                                                                 "rope_parameters": {**ROPE, "partial_rotary_factor": 1.0}},
                                               {"parallel_residual": False, "rope_fraction": 1.0, "activation": "gelu_tanh"}),
    # Llama with grouped-query attention (2 key/value heads for 4 query heads)
    "llama": ("LlamaConfig", {**LLAMA, "num_key_value_heads": 2, "rope_parameters": ROPE},
              {"norm": "rmsnorm", "activation": "swiglu", "n_kv_head": 2, "mlp_ratio": 2.625, "norm_eps": 1e-6,
               "tie_embeddings": False}),
    "llama tied, biases": ("LlamaConfig", {**LLAMA, "tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True},
                           {"n_kv_head": None, "bias": True, "tie_embeddings": True}),
}


def hf_folder(path, hf_tokenizer, config_class: str, options: dict, seed: int = 0):
    """A transformers model saved with its tokenizer, every weight (norms and biases too) moved well off its
    init so that a misplaced tensor shows in the logits; returns the model as saved."""
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**SMALL, **options)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(path)
    hf_tokenizer.save_pretrained(path)
    return model.eval()


@pytest.mark.parametrize("case", CASES)
def test_imported_model_gives_transformers_logits_and_exports_back(tmp_path, hf_tokenizer, case):
    config_class, options, expected = CASES[case]
    original = hf_folder(tmp_path / "hf", hf_tokenizer, config_class, options)
    ckpt = import_from_hf(tmp_path / "hf", tmp_path / "model.ckpt")
    assert (tmp_path / "model.ckpt.sha256").is_file()  # the sidecar train writes, checked on every load
    task, tokenizer = load_trained(str(ckpt))
    assert {k: task.hparams.model[k] for k in expected} == expected
    assert task.hparams.model["_target_"] == "lm_lightning.models.gpt.build_gpt"
    assert tokenizer.encode(TEXT) == hf_tokenizer.encode(TEXT, add_special_tokens=False)
    assert tokenizer.decode(tokenizer.encode(TEXT)) == TEXT

    ids = torch.randint(300, (2, T), generator=torch.Generator().manual_seed(1))  # the whole context
    with torch.no_grad():
        theirs, ours = original(ids).logits, task.model(ids)
        assert theirs.std() > 1.0
        assert (ours - theirs).abs().max().item() < 1e-4
        caches = task.model.new_caches(2, ours)  # decoding token by token reads the same rotary and key/value heads
        stepped = torch.cat([task.model(ids[:, :10], caches)] + [task.model(ids[:, t : t + 1], caches) for t in range(10, T)], 1)
        assert (stepped - theirs).abs().max().item() < 1e-4

    export_to_hf(ckpt, tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(back) is type(original)
    with torch.no_grad():
        assert (back(ids).logits - theirs).abs().max().item() < 1e-4


def test_import_command_then_continued_pretraining_from_the_imported_checkpoint(tmp_path, hf_tokenizer):
    hf_folder(tmp_path / "hf", hf_tokenizer, *CASES["llama"][:2])
    ckpt, cache = tmp_path / "llama.ckpt", tmp_path / "cache"
    proc = run_in_process("import", f"source={tmp_path / 'hf'}", f"out={ckpt}", "block_size=16", cwd=tmp_path, cache=cache)
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith(f"imported {tmp_path / 'hf'} (LlamaForCausalLM) to {ckpt} | max |logit difference| ")
    assert float(line.split("max |logit difference| ")[1].split()[0]) < 1e-4
    assert "context 16" in line and "tokenizer HFTokenizer (300 tokens)" in line

    again = run_in_process("import", f"source={tmp_path / 'hf'}", f"out={ckpt}", cwd=tmp_path, cache=cache, check=False)
    assert again.returncode == 2 and again.stderr.strip().splitlines()[-1] == (
        f"error: out={ckpt} exists: pass another out, or overwrite=true")

    corpus = tmp_path / "new.txt"
    corpus.write_text((SHARED_DATA / "tinyshakespeare" / "input.txt").read_text()[:20_000])
    run = tmp_path / "run"
    run_in_process("train", f"init_from={ckpt}", "data=text", f"data.corpus.source.path={corpus}", "data.batch_size=4",
                   "trainer.max_steps=3", "scheduler.warmup_steps=1", "trainer.val_check_interval=3",
                   "trainer.limit_val_batches=2", "sample.max_new_tokens=0", "logger=csv", f"hydra.run.dir={run}",
                   cwd=tmp_path, cache=cache)
    before, _ = load_trained(str(ckpt))
    after, _ = load_trained(str(run / "checkpoints" / "last.ckpt"))
    assert after.hparams.model == before.hparams.model  # Llama's shape, GQA and context came along
    assert after.tokenizer_model == before.tokenizer_model
    moved = [n for n, p in before.model.state_dict().items() if not torch.equal(p, after.model.state_dict()[n])]
    assert "wte.weight" in moved and "h.0.attn.c_attn.weight" in moved  # it trained from the imported weights


def test_export_then_import_of_a_trained_checkpoint_gives_it_back(tmp_path, tiny_checkpoint):
    export_to_hf(tiny_checkpoint, tmp_path / "hf", verify=False)
    back = import_from_hf(tmp_path / "hf", tmp_path / "back.ckpt")
    original, _ = load_trained(str(tiny_checkpoint))
    imported, _ = load_trained(str(back))
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    assert {**defaults, **original.hparams.model} == {**defaults, **imported.hparams.model}  # options newer than it: defaults
    assert imported.tokenizer_model == original.tokenizer_model  # the sentencepiece model, not its tokenizer.json
    for name, value in original.model.state_dict().items():
        torch.testing.assert_close(imported.model.state_dict()[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    "config_class, options, named",
    [
        ("LlamaConfig", {**LLAMA, "rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
         "config.json rope_parameters.rope_type='linear' (scaled rotary) has no lm-lightning counterpart"),
        ("LlamaConfig", {**LLAMA, "head_dim": 16}, "config.json head_dim=16 differs from hidden_size / num_attention_heads"),
        ("GPTNeoXConfig", {**NEOX, "hidden_act": "quick_gelu"}, "config.json hidden_act='quick_gelu' has no model.activation"),
        ("GPT2Config", {**GPT2, "scale_attn_by_inverse_layer_idx": True},
         "config.json scale_attn_by_inverse_layer_idx=True has no lm-lightning counterpart"),
        ("OPTConfig", {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "ffn_dim": 64,
                       "word_embed_proj_dim": 32, "max_position_embeddings": T}, "holds a opt model: import reads"),
    ],
)
def test_a_layout_without_an_exact_counterpart_is_refused_in_one_line(tmp_path, hf_tokenizer, config_class, options, named):
    hf_folder(tmp_path / "hf", hf_tokenizer, config_class, options)
    with pytest.raises(UserError) as err:
        import_from_hf(tmp_path / "hf", tmp_path / "model.ckpt")
    assert named in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "model.ckpt").exists()


def test_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(UserError, match="is not a transformers model folder \\(no config.json\\)"):
        import_from_hf(tmp_path, tmp_path / "model.ckpt")


# --- the model options the layouts need ---------------------------------------------------------


def test_new_gpt_options_default_to_todays_model():
    base = GPTConfig(vocab_size=50, block_size=T, n_layer=2, n_head=4, n_embd=32, position="rope", activation="swiglu")
    assert (base.n_kv_head, base.mlp_hidden, base.norm_eps, base.parallel_residual, base.rope_fraction) == (None, None, None, False, 1.0)
    model = GPT(base)
    assert model.h[0].attn.c_attn.out_features == 3 * 32 and model.h[0].mlp.c_fc.out_features == int(2 * 128 / 3)
    assert model.h[0].attn.rotary.dims == 8 and model.ln_f.eps == 1e-5


@pytest.mark.parametrize(
    "options, named",
    [
        ({"position": "rope", "parallel_residual": True, "norm": "rmsnorm", "activation": "swiglu"},
         "model.parallel_residual=true with LlamaForCausalLM"),
        ({"parallel_residual": True}, "model.parallel_residual=true with GPT2LMHeadModel"),
        ({"position": "rope", "n_kv_head": 2}, "model.n_kv_head=2 with GPTNeoXForCausalLM"),
        ({"position": "rope", "rope_fraction": 0.5, "norm": "rmsnorm", "activation": "swiglu"},
         "model.rope_fraction=0.5 with LlamaForCausalLM"),
    ],
)
def test_export_refuses_an_option_its_architecture_lacks(tmp_path, options, named):
    model = GPT(GPTConfig(vocab_size=50, block_size=T, n_layer=1, n_head=4, n_embd=32, **options))
    with pytest.raises(UserError, match=f"cannot export {named} to transformers"):
        save_hf(model, tmp_path / "hf")
