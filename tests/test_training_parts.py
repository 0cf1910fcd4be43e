"""The parts a training run is made of, each against an independent reference: nanoGPT's
learning-rate formula, hand-computed metrics, weight-decay groups, the causal-LM loss, and
the window sampler whose determinism makes a resumed run see exactly the same batches."""

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lm_lightning.data.datamodule import WindowDataset, WindowSampler
from lm_lightning.errors import UserError
from lm_lightning.models.gpt import GPT, GPTConfig
from lm_lightning.objectives.causal_lm import CausalLM
from lm_lightning.tasks.language_model import weight_decay_groups
from lm_lightning.tasks.metrics import LanguageModelMetrics
from lm_lightning.tasks.schedules import warmup_cosine




def tiny(**overrides) -> GPT:
    options = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)
    options.update(overrides)
    torch.manual_seed(0)
    return GPT(GPTConfig(**options))


# --- learning-rate schedule -------------------------------------------------------------------


def nanogpt_get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """nanoGPT train.py ``get_lr``, verbatim."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


@pytest.mark.parametrize("warmup", [0, 1, 10])
def test_warmup_cosine_matches_nanogpt_get_lr(warmup):
    lr, total, ratio = 6e-4, 100, 0.1
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)
    scheduler = warmup_cosine(optimizer, total_steps=total, warmup_steps=warmup, min_lr_ratio=ratio)
    seen = []
    for _ in range(total + 11):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    mid = (warmup + total) // 2
    for step in sorted({0, max(warmup - 1, 0), warmup, mid, total - 1, total, total + 10}):
        assert seen[step] == pytest.approx(nanogpt_get_lr(step, lr, warmup, total, lr * ratio), rel=1e-12)
    assert seen == pytest.approx([nanogpt_get_lr(s, lr, warmup, total, lr * ratio) for s in range(total + 11)])


def test_warmup_cosine_landmarks_by_hand():
    lr = 1.0
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = warmup_cosine(optimizer, total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    seen = []
    for _ in range(121):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(1 / 11)
    assert seen[9] == pytest.approx(10 / 11)
    assert seen[10] == pytest.approx(1.0)
    assert seen[60] == pytest.approx(0.55)  # half-way down the cosine: (1 + 0.1) / 2
    assert seen[110] == pytest.approx(0.1)
    assert seen[120] == pytest.approx(0.1)


@pytest.mark.parametrize("total,warmup", [(10, 10), (5, 10), (0, 0)])
def test_warmup_cosine_needs_total_beyond_warmup(total, warmup):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="total_steps"):
        warmup_cosine(optimizer, total_steps=total, warmup_steps=warmup)


# --- metrics ----------------------------------------------------------------------------------


def test_metrics_accumulate_summed_nll_over_tokens():
    metrics = LanguageModelMetrics(bytes_per_token=3.5)
    for nll_sum, n_tokens in [(10.0, 4), (6.0, 2), (2.0, 4)]:
        metrics.update(torch.tensor(nll_sum), torch.tensor(n_tokens))
    out = metrics.compute()
    loss = 18.0 / 10  # not the mean of the per-batch means (2.5, 3.0, 0.5)
    assert out["loss"].item() == pytest.approx(loss, rel=1e-6)
    assert out["perplexity"].item() == pytest.approx(math.exp(loss), rel=1e-6)
    assert out["bpb"].item() == pytest.approx(loss / (math.log(2) * 3.5), rel=1e-6)


def test_metrics_without_bytes_per_token_have_no_bpb_and_reset_to_empty():
    metrics = LanguageModelMetrics()
    metrics.update(torch.tensor(4.0), torch.tensor(2))
    assert set(metrics.compute()) == {"loss", "perplexity"}
    metrics.reset()
    metrics.update(torch.tensor(3.0), torch.tensor(3))
    assert metrics.compute()["loss"].item() == pytest.approx(1.0)


# --- weight decay groups ----------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_weight_decay_groups_split_matrices_from_gains_and_biases(norm):
    model = tiny(bias=True, norm=norm)
    decay, no_decay = weight_decay_groups(model, 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [id(p) for p in decay["params"] + no_decay["params"]]
    assert sorted(grouped) == sorted(names)  # every parameter exactly once, the tied head too
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed == {n for n, p in model.named_parameters() if p.dim() >= 2}
    assert {"wte.weight", "wpe.weight", "h.0.attn.c_attn.weight", "h.1.mlp.c_proj.weight"} <= decayed
    for name in (names[id(p)] for p in no_decay["params"]):
        assert name.endswith(".bias") or ".ln_" in name or name.startswith("ln_f."), name
    assert sum(p.numel() for p in decay["params"] + no_decay["params"]) == model.parameter_count().total
    torch.optim.AdamW([decay, no_decay], lr=1e-3)  # rejects a parameter listed in two groups


# --- causal LM objective ----------------------------------------------------------------------


def test_causal_lm_loss_is_cross_entropy_on_next_tokens():
    model = tiny()
    batch = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    out = CausalLM()(model, batch)
    # reference: log-probability of token t+1 under the logits at position t, by hand
    logprobs = model(batch[:, :8]).log_softmax(-1)
    nll = -logprobs.gather(-1, batch[:, 1:, None]).squeeze(-1)
    assert out.n_tokens.item() == 3 * 8
    assert out.loss.item() == pytest.approx(nll.mean().item(), rel=1e-5)
    assert out.nll_sum.item() == pytest.approx(nll.sum().item(), rel=1e-5)
    assert out.loss.requires_grad and not out.nll_sum.requires_grad


def test_causal_lm_ignores_masked_targets():
    model = tiny()
    batch = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    batch[:, -1] = -100  # only ever a target, never an input
    out = CausalLM()(model, batch)
    logprobs = model(batch[:, :8]).log_softmax(-1)
    nll = -logprobs[:, :7].gather(-1, batch[:, 1:8, None]).squeeze(-1)
    assert out.n_tokens.item() == 2 * 7
    assert out.loss.item() == pytest.approx(nll.mean().item(), rel=1e-5)


# --- windows and the sampler ------------------------------------------------------------------

N_TOKENS, BLOCK = 1000, 32


def order(mode, seed=0, epoch=0, rank=0, world_size=1, n_tokens=N_TOKENS, block=BLOCK):
    sampler = WindowSampler(n_tokens, block, mode, seed, rank, world_size)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_window_item_is_the_next_block_plus_one_tokens_as_int64():
    tokens = (np.arange(100, dtype=np.uint16) * 7919) % 65535
    dataset = WindowDataset(tokens, block_size=8)
    assert len(dataset) == 100 - 8
    for start in (0, 41, 91):  # 91 is the last start with a full window
        item = dataset[start]
        assert item.dtype == torch.int64
        assert item.tolist() == [int(t) for t in tokens[start : start + 9]]


@pytest.mark.parametrize("mode", ["shuffled", "random", "sequential"])
def test_order_is_a_function_of_seed_and_epoch(mode):
    assert order(mode, seed=3, epoch=2) == order(mode, seed=3, epoch=2)
    if mode != "sequential":
        assert order(mode, seed=3, epoch=2) != order(mode, seed=3, epoch=3)
        assert order(mode, seed=3, epoch=2) != order(mode, seed=4, epoch=2)


@pytest.mark.parametrize("epoch", range(6))
def test_shuffled_covers_each_non_overlapping_window_once(epoch):
    starts = order("shuffled", seed=1, epoch=epoch)
    phase = min(starts)
    assert 0 <= phase < BLOCK
    # every window phase + k·block that fits block + 1 tokens, by hand
    expected, s = [], phase
    while s + BLOCK + 1 <= N_TOKENS:
        expected.append(s)
        s += BLOCK
    assert sorted(starts) == expected
    assert starts != expected  # and not in order


def test_shuffled_phase_varies_across_epochs():
    assert len({min(order("shuffled", seed=1, epoch=e)) for e in range(8)}) > 1


def test_sequential_windows_start_at_zero_with_stride_block():
    expected = [k * BLOCK for k in range((N_TOKENS - 1) // BLOCK)]  # k·block + block + 1 ≤ n
    assert order("sequential", epoch=0) == expected
    assert order("sequential", epoch=5, seed=9) == expected
    assert order("sequential", n_tokens=4 * BLOCK + 1) == [0, BLOCK, 2 * BLOCK, 3 * BLOCK]


def test_random_starts_are_valid_windows():
    starts = order("random", seed=2)
    assert len(starts) == (N_TOKENS - BLOCK) // BLOCK
    assert all(0 <= s < N_TOKENS - BLOCK for s in starts)
    assert len(set(starts)) > 1
    every = [s for e in range(50) for s in order("random", seed=2, epoch=e)]
    assert min(every) < BLOCK and max(every) >= N_TOKENS - 2 * BLOCK  # not confined to a grid or a prefix
    assert any(s % BLOCK != every[0] % BLOCK for s in every)


@pytest.mark.parametrize("mode", ["shuffled", "random", "sequential"])
def test_ranks_get_equal_disjoint_shares_of_one_stream(mode):
    world = 3
    full = order(mode, seed=5, epoch=1)
    shares = [order(mode, seed=5, epoch=1, rank=r, world_size=world) for r in range(world)]
    per_rank = len(full) // world
    assert [len(s) for s in shares] == [per_rank] * world
    # interleaved: the ranks' i-th items are the single process's i-th group of `world` items
    assert [s[i] for i in range(per_rank) for s in shares] == full[: world * per_rank]
    if mode != "random":
        assert len(set(sum(shares, []))) == world * per_rank
    sampler = WindowSampler(N_TOKENS, BLOCK, mode, 5, rank=1, world_size=world)
    sampler.set_epoch(1)
    assert len(sampler) == per_rank


@pytest.mark.parametrize("mode", ["shuffled", "random", "sequential"])
def test_skip_yields_the_tail_once(mode):
    sampler = WindowSampler(N_TOKENS, BLOCK, mode, seed=7)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.skip = 10
    # the length stays the whole epoch: Lightning counts the restored batches and stops at the
    # end of the iterator; a shortened length would end the resumed epoch early
    assert len(sampler) == len(full)
    assert list(sampler) == full[10:]
    assert list(sampler) == full  # the skip applies to the resumed epoch only


def test_resumed_loader_yields_the_remaining_batches():
    tokens = np.arange(N_TOKENS, dtype=np.uint16)
    dataset, batch_size, consumed = WindowDataset(tokens, BLOCK), 4, 3

    def batches(skip):
        sampler = WindowSampler(N_TOKENS, BLOCK, "shuffled", seed=11)
        sampler.set_epoch(2)
        sampler.skip = skip
        return [b.tolist() for b in DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True)]

    uninterrupted = batches(0)
    assert batches(consumed * batch_size) == uninterrupted[consumed:]


def test_unknown_sampling_mode_is_a_user_error():
    with pytest.raises(UserError, match="data.sampling"):
        WindowSampler(N_TOKENS, BLOCK, "strided", seed=0)


# --- validation batches during fit and after it -------------------------------------------------


def test_evaluations_during_fit_read_limit_val_batches_and_the_final_validation_the_whole_split(tmp_path):
    from functools import partial

    import lightning as L

    from lm_lightning.tasks.language_model import LanguageModelTask
    from lm_lightning.tracking.callbacks import FinalValidationBatches

    class CountBatches(L.Callback):
        def __init__(self) -> None:
            self.counts: list[int] = []

        def on_validation_start(self, trainer, pl_module) -> None:
            self.counts.append(0)

        def on_validation_batch_end(self, *args, **kwargs) -> None:
            self.counts[-1] += 1

    torch.manual_seed(0)
    task = LanguageModelTask(model={"_target_": "lm_lightning.models.gpt.build_gpt", "vocab_size": 50, "block_size": 16,
                                    "n_layer": 1, "n_head": 2, "n_embd": 16},
                             objective={"_target_": "lm_lightning.objectives.causal_lm.CausalLM"},
                             optimizer=partial(torch.optim.AdamW, lr=1e-3))
    windows = [torch.randint(50, (2, 17)) for _ in range(5)]
    counter = CountBatches()
    trainer = L.Trainer(accelerator="cpu", max_steps=4, val_check_interval=2, limit_val_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[FinalValidationBatches(1.0), counter],
                        default_root_dir=tmp_path)
    trainer.fit(task, train_dataloaders=DataLoader(windows, batch_size=None),
                val_dataloaders=DataLoader(windows, batch_size=None))
    assert counter.counts == [2, 2]
    assert task.last_val_step is None  # the 2-batch estimate at step 4 is not the final figure
    trainer.validate(task, dataloaders=DataLoader(windows, batch_size=None), verbose=False)
    assert counter.counts == [2, 2, 5]


# --- gradient clipping reuses the non-finite guard's norm ------------------------------------------


def test_clipping_reuses_the_guards_norm_and_clips_as_lightning_does(tmp_path, monkeypatch):
    from functools import partial

    import lightning as L

    from lm_lightning.tasks.language_model import LanguageModelTask
    from lm_lightning.training.guards import NonFiniteGuard

    norms = []  # every total-norm pass over the gradients: the guard's and clipping's own

    def counted(original):
        def norm(*args, **kwargs):
            norms.append(1)
            return original(*args, **kwargs)
        return norm

    monkeypatch.setattr(torch.nn.utils, "get_total_norm", counted(torch.nn.utils.get_total_norm))
    monkeypatch.setattr(torch.nn.utils.clip_grad, "_get_total_norm", counted(torch.nn.utils.clip_grad._get_total_norm))
    windows = [torch.randint(50, (2, 17)) for _ in range(3)]

    def train(callbacks):
        torch.manual_seed(0)
        task = LanguageModelTask(model={"_target_": "lm_lightning.models.gpt.build_gpt", "vocab_size": 50,
                                        "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16},
                                 objective={"_target_": "lm_lightning.objectives.causal_lm.CausalLM"},
                                 optimizer=partial(torch.optim.AdamW, lr=1e-2))
        trainer = L.Trainer(accelerator="cpu", max_steps=3, gradient_clip_val=0.05, logger=False, callbacks=callbacks,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path)
        trainer.fit(task, train_dataloaders=DataLoader(windows, batch_size=None))
        return task.state_dict()

    lightnings = train([])  # Lightning's clipping: one norm a step
    assert len(norms) == 3
    norms.clear()
    reused = train([NonFiniteGuard()])  # the guard's norm, reused: still one a step
    assert len(norms) == 3
    for name, value in lightnings.items():
        torch.testing.assert_close(reused[name], value, rtol=0, atol=0, msg=name)
