"""``lm-lightning <command> [hydra overrides]``: one console command, one Hydra app per subcommand."""

from __future__ import annotations

import atexit
import gc
import importlib
import os
import re
import sys

from lm_lightning.config import help_page

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
    "scaling coordcheck": ("lm_lightning.cli.scaling_coordcheck", "μP coordinate check: activation scale per layer against "
                           "width after a few steps (conf/scaling_coordcheck.yaml)"),
    "scaling plan": ("lm_lightning.cli.scaling_plan", "model shape and steps that spend a compute budget (conf/scaling_plan.yaml)"),
    "compare": ("lm_lightning.cli.compare", "runs side by side from their records: table, CSV, curves, HTML report "
                "(conf/compare.yaml)"),
}
WIDTH = max(map(len, COMMANDS))  # the name column of the usage pages


def usage() -> str:
    rows = "\n".join(f"  {name:<{WIDTH}} {help_}" for name, (_, help_) in COMMANDS.items())
    return (
        "usage: lm-lightning <command> [key=value ...] [-m] [--help]\n\n"
        f"commands:\n{rows}\n\n"
        "Every command is a Hydra app: override any config value as key=value, run a sweep with -m,\n"
        "and see the composed config with --cfg job. Example: lm-lightning train experiment=shakespeare_char\n"
        "lm-lightning <command> --help lists its groups, options and experiments; "
        'eval "$(lm-lightning -sc install=bash)" completes them in bash'
    )


def _collect_once_at_exit() -> None:
    """One last garbage collection (reference cycles are finalized as at any exit), then the heap frozen:
    the interpreter's teardown would otherwise collect the whole heap of torch, Lightning and W&B objects
    over and over while it clears modules, about a second of CPU at the end of every command."""
    gc.collect()
    gc.freeze()


HELP = ("-h", "--help")
SHELL_COMPLETION = ("-sc", "--shell-completion")


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] in (*HELP, "help"):
        print(usage())
        return
    if args[0] in SHELL_COMPLETION:  # `lm-lightning -sc install=bash`, and the installed script's queries
        _shell_completion(args[1] if len(args) > 1 else "")
        return
    command, args = _command(args)
    if any(arg in HELP for arg in args) and help_page.config_file(command).is_file():
        print(help_page.help_page(command, COMMANDS[command][1]))  # the command's own page, not Hydra's generic one
        return
    if completion := [args[i + 1] for i, arg in enumerate(args[:-1]) if arg in SHELL_COMPLETION]:
        _completion_app(command, completion[0])  # `lm-lightning train -sc install=bash`
        return
    # registered before the command's imports: exit handlers run last-in first-out, so this one runs after
    # W&B's, Lightning's and the launchers', just before the interpreter's teardown
    atexit.unregister(_collect_once_at_exit)
    atexit.register(_collect_once_at_exit)
    if command != "compare":  # compare reads bare run folders itself (cli/compare.py hydra_arguments)
        from lm_lightning.config.overrides import quote_values

        args = quote_values(args)  # `ckpt_path=<job folder with = and ,>/last.ckpt`, `sample.prompt=Été`
    module = importlib.import_module(COMMANDS[command][0])
    sys.argv = [f"lm-lightning {command}", *args]
    # Lightning's DDP/FSDP launcher re-runs `python -m <__main__.__spec__.name> <sys.argv[1:]>` for
    # each extra rank: point it at the command's own module (`python -m lm_lightning.cli.train ...`)
    sys.modules["__main__"].__spec__ = module.__spec__
    module.main()


def _command(args: list[str]) -> tuple[str, list[str]]:
    """(command, its arguments) from the words after ``lm-lightning``; exits with a usage line if they name none.
    Two-word commands: ``scaling fit``, ``evaluate harness``; ``evaluate task=zero_shot`` is ``score``."""
    first, rest = args[0], args[1:]
    if rest and f"{first} {rest[0]}" in COMMANDS:
        return f"{first} {rest[0]}", rest[1:]
    if first == "evaluate" and "task=zero_shot" in rest:
        return "score", [arg for arg in rest if arg != "task=zero_shot"]
    if first in COMMANDS:
        return first, rest
    if subcommands := _subcommands(first):  # `lm-lightning scaling [--help]`: the group's commands
        names = "|".join(subcommands)
        page = f"usage: lm-lightning {first} <{names}> [key=value ...] [--help]\n\ncommands:\n" + "\n".join(
            f"  {name:<{WIDTH}} {help_}" for name, (_, help_) in COMMANDS.items() if name.startswith(f"{first} "))
        if any(arg in HELP for arg in rest):
            print(page)
            sys.exit(0)
        wrong = f"{first} {rest[0]}" if rest else first
        print(f"{page}\n\nerror: lm-lightning {wrong} is not a command: choose lm-lightning {first} <{names}>",
              file=sys.stderr)
        sys.exit(2)
    print(f"error: unknown command {first!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
    sys.exit(2)


def _subcommands(first: str) -> list[str]:
    return [name.split(" ", 1)[1] for name in COMMANDS if name.startswith(f"{first} ")]


def _shell_completion(request: str) -> None:
    """``lm-lightning -sc <request>``: ``install=bash`` (zsh, fish) prints Hydra's script, which completes the
    whole ``lm-lightning`` program; the shell then calls ``lm-lightning -sc query=bash`` with the line typed so far
    in ``COMP_LINE``. Until a command is typed the answer is the command names (here); after it, Hydra answers
    from that command's config, with the command's words taken out of ``COMP_LINE`` (Hydra expects one word)."""
    command = "train"  # install, uninstall: the script is the same for every command
    if request.startswith("query="):
        line = os.environ.get("COMP_LINE", "")
        words = line.split()[1:]
        typed = words if line.endswith(" ") else words[:-1]  # the words finished so far, after the program's name
        used = 2 if len(typed) >= 2 and " ".join(typed[:2]) in COMMANDS else 1
        command = " ".join(typed[:used])
        if command not in COMMANDS:
            first_words = dict.fromkeys(name.split()[0] for name in COMMANDS)
            print(" ".join(_subcommands(typed[0]) if len(typed) == 1 else [] if typed else first_words))
            return
        os.environ["COMP_LINE"] = re.sub(rf"^\s*\S+(\s+\S+){{{used}}}", "lm-lightning", line)
    _completion_app(command, request)


def _completion_app(command: str, request: str) -> None:
    """Hydra's shell completion over the command's config, from a bare app: the command's own module (torch,
    Lightning) is not imported for a key press. Hydra names the script's program after ``sys.argv[0]``."""
    import hydra

    sys.argv = ["lm-lightning", "-sc", request]
    hydra.main(version_base="1.3", config_path=str(help_page.CONF), config_name=command.replace(" ", "_"))(
        lambda cfg: None)()


if __name__ == "__main__":
    main()
