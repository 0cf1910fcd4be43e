"""``lm-lightning <command> [hydra overrides]``: one console command, one Hydra app per subcommand."""

from __future__ import annotations

import atexit
import gc
import importlib
import sys

COMMANDS = {
    "train": ("lm_lightning.cli.train", "train a model from a composed config (conf/train.yaml)"),
    "prepare": ("lm_lightning.cli.prepare", "clean, split and tokenize a corpus into the cache (conf/prepare.yaml)"),
    "evaluate": ("lm_lightning.cli.evaluate", "loss, perplexity and bits-per-byte of a checkpoint on a text file "
                 "(task=zero_shot: as score)"),
    "evaluate harness": ("lm_lightning.cli.evaluate_harness", "lm-evaluation-harness tasks on a checkpoint, offline "
                         "(conf/evaluate_harness.yaml)"),
    "generate": ("lm_lightning.cli.generate", "sample text from a checkpoint (greedy, top-k, top-p, temperature)"),
    "finetune": ("lm_lightning.cli.finetune", "a classification head on a checkpoint, fine-tuned on a labelled TSV (SST-2 by default)"),
    "score": ("lm_lightning.cli.score", "zero-shot classification accuracy of a checkpoint (default: SST-2 dev) beside the majority class"),
    "align": ("lm_lightning.cli.align", "preference tuning of a checkpoint: reward model, DPO, KTO or PPO (conf/align.yaml)"),
    "distill": ("lm_lightning.cli.distill", "knowledge distillation of a teacher checkpoint into a smaller student (conf/distill.yaml)"),
    "quantize": ("lm_lightning.cli.quantize", "int8 quantization of a checkpoint (post-training or quantization-aware) with size and speed"),
    "export": ("lm_lightning.cli.export", "a GPT checkpoint as a Hugging Face transformers model folder (needs the [hf] extra)"),
    "import": ("lm_lightning.cli.import_hf", "a Hugging Face transformers folder (GPT-2, GPT-NeoX, Llama) as a checkpoint"),
    "estimate": ("lm_lightning.cli.estimate", "parameters, FLOPs/token and memory per device of a model config (conf/estimate.yaml)"),
    "scaling fit": ("lm_lightning.cli.scaling_fit", "scaling laws fitted from the run records of sweeps (conf/scaling_fit.yaml)"),
    "scaling plan": ("lm_lightning.cli.scaling_plan", "model shape and steps that spend a compute budget (conf/scaling_plan.yaml)"),
}


def usage() -> str:
    rows = "\n".join(f"  {name:<16} {help_}" for name, (_, help_) in COMMANDS.items())
    return (
        "usage: lm-lightning <command> [key=value ...] [-m] [--help]\n\n"
        f"commands:\n{rows}\n\n"
        "Every command is a Hydra app: override any config value as key=value, run a sweep with -m,\n"
        "and see the composed config with --cfg job. Example: lm-lightning train experiment=shakespeare_char"
    )


def _collect_once_at_exit() -> None:
    """One last garbage collection (reference cycles are finalized as at any exit), then the heap frozen:
    the interpreter's teardown would otherwise collect the whole heap of torch, Lightning and W&B objects
    over and over while it clears modules, about a second of CPU at the end of every command."""
    gc.collect()
    gc.freeze()


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help", "help"):
        print(usage())
        return
    command = sys.argv[1]
    if command == "scaling" and len(sys.argv) > 2:  # two-word commands: scaling fit, scaling plan
        command = f"scaling {sys.argv.pop(2)}"
    if command == "evaluate" and sys.argv[2:3] == ["harness"]:  # evaluate harness: lm-eval tasks
        command = f"evaluate {sys.argv.pop(2)}"
    if command == "evaluate" and "task=zero_shot" in sys.argv[2:]:  # the zero-shot evaluation is `score`
        command = "score"
        sys.argv.remove("task=zero_shot")
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    # registered before the command's imports: exit handlers run last-in first-out, so this one runs after
    # W&B's, Lightning's and the launchers', just before the interpreter's teardown
    atexit.unregister(_collect_once_at_exit)
    atexit.register(_collect_once_at_exit)
    module = importlib.import_module(COMMANDS[command][0])
    sys.argv = [f"lm-lightning {command}", *sys.argv[2:]]
    # Lightning's DDP/FSDP launcher re-runs `python -m <__main__.__spec__.name> <sys.argv[1:]>` for
    # each extra rank: point it at the command's own module (`python -m lm_lightning.cli.train ...`)
    sys.modules["__main__"].__spec__ = module.__spec__
    module.main()


if __name__ == "__main__":
    main()
