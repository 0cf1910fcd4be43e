"""EleutherAI's lm-evaluation-harness over a left-to-right lm-lightning checkpoint: :class:`LightningLM`, a native
``lm_eval`` model (registered as ``lm-lightning``), and :func:`run_tasks`, which runs lm-eval tasks on it offline.

Requests are scored as lm-eval's own ``hf`` model scores them, so a checkpoint and its ``lm-lightning export``
folder give the same figures:

- ``loglikelihood``: context and continuation tokenized together and split where the context ends
  (``TemplateLM._encode_pair``), the last ``max_length + 1`` tokens kept, one forward pass per batch;
- ``loglikelihood_rolling``: lm-eval's disjoint windows of ``max_length`` predictions after a prefix token
  (``get_rolling_token_windows`` with ``context_len=1``): the document read as the stream ``[prefix] + tokens``
  in non-overlapping windows, the last one moved back to end at the end — what ``score_stream(..., stride=window)``
  of :mod:`lm_lightning.evaluation.perplexity` computes on that stream;
- ``generate_until``: prompts of equal length decoded together with the KV cache (``generation.generate``),
  the text cut at end-of-sequence and at the first stop string.

The prefix token, and the context of an empty prompt, is end-of-sequence: in the training stream every
document follows one.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import LM, TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from lm_lightning.adaptation.batching import right_pad
from lm_lightning.errors import UserError
from lm_lightning.generation import generate
from lm_lightning.models.capabilities import families_where, reads_left_to_right

#: generation options of lm-eval tasks that decoding here honours (others are refused, not ignored)
GENERATION_OPTIONS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")

Request = tuple[tuple[str, str] | None, list[int], list[int]]  # (strings for the cache, context ids, continuation ids)


@register_model("lm-lightning")
class LightningLM(TemplateLM):
    """A trained causal model and its tokenizer as an lm-eval model.

    ``LightningLM(ckpt_path=<file.ckpt>)`` loads a checkpoint, as ``lm_eval.simple_evaluate(model="lm-lightning",
    model_args={"ckpt_path": ...})`` does once this module is imported; or give ``model`` and ``tokenizer``.
    ``max_length``: tokens the model reads at once (default: its context); ``max_gen_toks``: tokens generated
    when a task sets no ``max_gen_toks``; ``seed``: of sampled generation (``do_sample``).
    """

    def __init__(self, ckpt_path: str | None = None, batch_size: int | str = 16, device: str | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256, seed: int = 0,
                 max_batch_size: int | None = None, *, model: torch.nn.Module | None = None, tokenizer=None) -> None:
        super().__init__()  # max_batch_size: lm-eval passes it to every model; batches here are batch_size
        if (ckpt_path is None) == (model is None) or (model is None) != (tokenizer is None):
            raise UserError("LightningLM takes ckpt_path=<file.ckpt>, or a model and its tokenizer")
        if ckpt_path is not None:
            from lm_lightning.training.loading import load_trained

            task, tokenizer = load_trained(str(ckpt_path))
            model = task.model
        if not reads_left_to_right(model.traits):
            families = ", ".join(families_where(lambda cls, traits: reads_left_to_right(traits)))
            raise UserError(f"lm-eval scores text left to right and a {model.config.family} model does not read it "
                            f"so: use a checkpoint of one of {families}")
        if str(batch_size) == "auto" or not str(batch_size).isdigit() or int(batch_size) < 1:
            raise UserError(f"batch_size={batch_size}: give a number of sequences per forward pass")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self._device)
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.checkpoint = None if ckpt_path is None else str(ckpt_path)
        context = model.context_length
        if max_length is not None and not 1 <= int(max_length) <= context:
            raise UserError(f"max_length={max_length}: the model reads at most {context} tokens at once")
        self._max_length = int(max_length or context)
        self.max_gen_toks = int(max_gen_toks)
        self._generator = torch.Generator(self._device).manual_seed(int(seed))
        self.pad_id = max(getattr(tokenizer, "pad_id", 0), 0)  # right padding: causal positions never read it
        #: per lm-eval task, the tokens and summed log-likelihood (nats) of its rolling requests (token perplexity)
        self.rolling_totals: dict[str, dict[str, float]] = {}

    # --- what lm-eval reads -------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"lm-lightning-{getattr(self.tokenizer, 'sha256', 'tokenizer')[:16]}"  # request caches keyed by it

    def get_model_info(self) -> dict[str, Any]:
        """What the results' ``config`` records about the model."""
        return {"checkpoint": self.checkpoint, "family": self.model.config.family, "max_length": self.max_length,
                "parameters": sum(p.numel() for p in self.model.parameters())}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string)  # no special tokens: the training stream has none inside a document

    def tok_decode(self, ids: Iterable[int]) -> str:
        vocab = getattr(self.tokenizer, "vocab_size", None)
        # an objective's extra ids (sentinels, [MASK]) sit above the tokenizer's vocabulary: not text
        return self.tokenizer.decode([i for i in ids if vocab is None or i < vocab])

    # --- scoring ------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests: Sequence[Request], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(summed log-probability in nats, whether greedy decoding gives the continuation) per request.
        Longest first, so each batch pads little; the context is cut from the left to fit ``max_length``."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        for batch in tqdm(list(_chunks(order, self.batch_size)), desc="scoring", disable=disable_tqdm):
            inputs, continuations = [], []
            for i in batch:
                _, context, continuation = requests[i]
                if not continuation or len(continuation) > self.max_length:
                    raise UserError(f"a task's answer of {len(continuation)} tokens cannot be scored by a model that "
                                    f"reads {self.max_length} at once: give answers of 1 to {self.max_length} tokens")
                inputs.append((context + continuation)[-(self.max_length + 1) : -1])
                continuations.append(continuation)
            ids, lengths = right_pad(inputs, self.pad_id, self._device)
            logits = self.model(ids)  # (B, T, V)
            for row, (i, continuation) in enumerate(zip(batch, continuations)):
                end = int(lengths[row])
                logprobs = logits[row, end - len(continuation) : end].float().log_softmax(-1)  # (n, V)
                targets = torch.tensor(continuation, device=self._device)
                score = float(logprobs.gather(-1, targets[:, None]).sum())
                results[i] = (score, bool((logprobs.argmax(-1) == targets).all()))
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Summed log-probability (nats) of each whole text, from lm-eval's disjoint windows after the prefix token."""
        windows: list[Request] = []
        owners: list[int] = []
        for i, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0])
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(i)
            self.rolling_totals.setdefault(request.task_name or "", {"tokens": 0, "nats": 0.0})["tokens"] += len(tokens)
        scores = [0.0] * len(requests)
        for i, (score, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            scores[i] += score
        for request, score in zip(requests, scores):
            self.rolling_totals[request.task_name or ""]["nats"] -= score
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, score)
        return scores

    # --- generation ---------------------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each prompt's continuation, greedy unless the task asks ``do_sample``; prompts of the same length
        and options go through :func:`generate` together, ``batch_size`` at a time."""
        outputs: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, list[int]]]] = {}
        for i, request in enumerate(requests):
            context, options = request.args
            settings = self._generation_settings(options)
            # the prompt's end when it is longer than the context; past the context, generation slides its window
            ids = (self.tok_encode(context) or [self.prefix_token_id])[-self.max_length :]
            groups.setdefault((len(ids), tuple(sorted(settings.items()))), []).append((i, ids))
        for (length, settings), members in tqdm(groups.items(), desc="generating", disable=disable_tqdm):
            options = dict(settings)
            until = options.pop("until")
            for batch in _chunks(members, self.batch_size):
                prompts = torch.tensor([ids for _, ids in batch], device=self._device)
                out = generate(self.model, prompts, eos_id=self.eot_token_id, use_cache=True,
                               generator=self._generator, **options)
                for row, (i, _) in enumerate(batch):
                    text = self.tok_decode(_before(out[row, length:].tolist(), self.eot_token_id))
                    outputs[i] = _cut(text, until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, outputs[i])
        return outputs

    def _generation_settings(self, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """lm-eval's generation options → :func:`generate`'s arguments, with the stop strings as ``until``."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(GENERATION_OPTIONS))
        if unknown:
            raise UserError(f"generation option(s) {', '.join(unknown)} of this task are not supported by the "
                            f"lm-lightning model: it honours {', '.join(GENERATION_OPTIONS)}")
        until = options.get("until") or []
        sample = bool(options.get("do_sample")) and float(options.get("temperature", 1.0)) > 0
        return {
            "until": tuple([until] if isinstance(until, str) else until),
            "max_new_tokens": int(options.get("max_gen_toks") or self.max_gen_toks),
            "temperature": float(options.get("temperature", 1.0)) if sample else 0.0,
            "top_k": int(options["top_k"]) if sample and options.get("top_k") else None,
            "top_p": float(options["top_p"]) if sample and options.get("top_p") is not None else None,
        }


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _before(ids: list[int], stop_id: int) -> list[int]:
    return ids[: ids.index(stop_id)] if stop_id in ids else ids


def _cut(text: str, stops: Iterable[str]) -> str:
    """``text`` up to the first of ``stops``."""
    cuts = [text.index(s) for s in stops if s and s in text]
    return text[: min(cuts)] if cuts else text


# --- running tasks --------------------------------------------------------------------------------------------------

#: the task files shipped with the package (SST-2 zero-shot, WikiText-2 rolling perplexity), read from local data
TASKS_DIR = Path(__file__).resolve().parents[1] / "conf" / "harness" / "tasks"


def run_tasks(lm: LM, tasks: Sequence[str], include_path: Sequence[str | Path] = (), include_defaults: bool = False,
              metadata: Mapping[str, Any] | None = None, num_fewshot: int | None = None,
              limit: float | None = None, bootstrap_iters: int = 1000, seed: int = 0) -> dict[str, Any]:
    """lm-eval's results for ``tasks`` on ``lm`` (this module's model or any lm-eval model, e.g. ``hf``), offline.

    Task names are looked up in :data:`TASKS_DIR`, the folders of ``include_path`` and, with
    ``include_defaults``, lm-eval's own tasks (their data must already be in the Hugging Face cache);
    ``metadata`` reaches every task's data loader (``data_dir``, ``sst2_file``, ``wikitext_file``: see
    :mod:`lm_lightning.evaluation.harness_data`). ``limit``: the first this many examples of each task.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lm_lightning.evaluation.harness_data import shared_data_dir

    folders = [TASKS_DIR, *(Path(p) for p in include_path)]
    missing = [str(p) for p in folders if not p.is_dir()]
    if missing:
        raise UserError(f"include_path: no folder {', '.join(missing)} (give folders of lm-eval task YAML files)")
    with offline():
        manager = TaskManager(include_path=[str(p) for p in folders], include_defaults=include_defaults,
                              metadata={"data_dir": str(shared_data_dir()), **(metadata or {})})
        unknown = [name for name in tasks if not manager.match_tasks([name])]
        if unknown:
            known = ", ".join(sorted(set(manager.all_tasks) - set(manager.all_tags))[:20])
            where = "" if include_defaults else " (lm-eval's own tasks need include_defaults=true)"
            raise UserError(f"unknown lm-eval task(s) {', '.join(unknown)}{where}; tasks found: {known}")
        if isinstance(lm, LightningLM):
            lm.rolling_totals.clear()
        return simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                               bootstrap_iters=bootstrap_iters, task_manager=manager, log_samples=False,
                               random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                               fewshot_random_seed=seed)


def figures(results: Mapping[str, Any], lm: LM | None = None) -> dict[str, float]:
    """``<task>/<metric>`` (``<task>/<metric>/<filter>`` for a filter other than ``none``) → value, with each
    rolling task's ``token_perplexity`` (exp of nats per token) where ``lm`` is this module's model."""
    out: dict[str, float] = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # the alias, and stderr "N/A"
            metric, filter_name = key.split(",", 1)
            out[f"{task}/{metric}" + ("" if filter_name == "none" else f"/{filter_name}")] = float(value)
        totals = getattr(lm, "rolling_totals", {}).get(task)
        if totals and totals["tokens"]:
            out[f"{task}/token_perplexity"] = math.exp(totals["nats"] / totals["tokens"])
            out[f"{task}/tokens"] = totals["tokens"]
    return out


def results_table(results: Mapping[str, Any], lm: LM | None = None) -> str:
    """lm-eval's own markdown table of the results (and of the groups), then each rolling task's token perplexity."""
    from lm_eval.utils import make_table

    tables = [make_table(results).rstrip()]
    if results.get("groups"):
        tables.append(make_table(results, "groups").rstrip())
    for task, totals in sorted(getattr(lm, "rolling_totals", {}).items()):
        if totals["tokens"]:
            tables.append(f"{task}: token perplexity {math.exp(totals['nats'] / totals['tokens']):.4f} over "
                          f"{int(totals['tokens']):,} tokens ({totals['nats']:.2f} nats)")
    return "\n".join(tables)


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hugging Face libraries never reach the network: they read ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` once
    at import, so the environment (for a first import) and the values of imported modules are both set."""
    import datasets
    import huggingface_hub.constants as hub

    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    environment = {name: os.environ.get(name) for name in names}
    values = hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE
    os.environ.update(dict.fromkeys(names, "1"))
    hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = values
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
