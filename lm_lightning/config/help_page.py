"""``lm-lightning <command> --help``: the command's own config groups, options and experiments with their YAML comments.

Hydra's generic page lists every group of the config folder (also those the command does not use) and the whole
composed config without comments. This page is read from the command's ``conf/<command>.yaml`` as written:
its header comment, the groups of its defaults list with their options, its keys with their defaults and
comments (and those of the config it extends: distill and scaling plan extend train's), and its experiments.
"""

from __future__ import annotations

import re
from pathlib import Path

# the package's config folder (config.app.CONF_DIR), named here so that help is printed without importing torch
CONF = Path(__file__).resolve().parents[1] / "conf"
KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[\w.]+):(?P<rest>.*)$")
DEFAULT = re.compile(r"^\s*-\s*(?P<entry>[^#]+?)\s*(#\s*(?P<comment>.*))?$")


def config_file(command: str) -> Path:
    """``conf/<command>.yaml`` of a command: ``scaling fit`` reads conf/scaling_fit.yaml."""
    return CONF / f"{command.replace(' ', '_')}.yaml"


def help_page(command: str, summary: str = "") -> str:
    """The help page of ``command`` (e.g. ``train``, ``scaling fit``); ``summary``: its one-line description."""
    path = config_file(command)
    lines = path.read_text().splitlines()
    groups, bases = _defaults(lines)
    options = _options(lines)
    for base in bases:  # the config it extends (distill: train): its groups and its keys not set here
        base_lines = config_file(base).read_text().splitlines()
        base_groups, _ = _defaults(base_lines)
        groups = {**base_groups, **groups}
        options += [(key, value, comment) for key, value, comment in _options(base_lines)
                    if key not in {own for own, _, _ in options}]
    choose = " [group=option ...]" if groups else ""
    out = [f"usage: lm-lightning {command} [key=value ...]{choose} [-m] [--cfg job] [-sc install=bash]", ""]
    header = [line.lstrip("# ").rstrip() for line in _header(lines)]
    out += header or [summary]  # the file's own description, else the command list's line
    if groups:
        out += ["", "config groups (group=option; the options are the files of conf/<group>/):"]
        for group, (option, comment) in groups.items():
            choices = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
            out.append(_row(f"{group}={option}", comment))
            if choices:
                out.append(_row("", "options: " + ", ".join(choices)))
    out += ["", f"options (key=value; a new key needs a leading +), as set in conf/{path.name}:"]
    out += [_row(f"{key}={value}" if value else key, comment) for key, value, comment in options]
    if experiments := _experiments(command):
        out += ["", "experiments (experiment=<name>, conf/experiment/):"]
        out += [_row(name, text) for name, text in experiments]
    out += ["", "--cfg job prints the composed config; -m runs a sweep (key=a,b); --hydra-help shows Hydra's own flags;",
            "eval \"$(lm-lightning -sc install=bash)\" completes commands, keys and groups in bash."]
    return "\n".join(out)


def _header(lines: list[str]) -> list[str]:
    """The comment lines at the top of the file."""
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        if not line.startswith("# @package"):
            header.append(line)
    return header


def _defaults(lines: list[str]) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """({group: (default option, comment)}, the configs it extends) from the defaults list. The experiment group
    is left to the experiments list; ``override hydra/...`` entries and ``_self_`` are Hydra's."""
    groups, bases, inside = {}, [], False
    for line in lines:
        if line.startswith("defaults:"):
            inside = True
            continue
        if inside and not line.startswith((" ", "-")):
            break
        if inside and (found := DEFAULT.match(line)):
            entry, comment = found.group("entry"), found.group("comment") or ""
            group, colon, option = entry.partition(":")
            if not colon and entry != "_self_":
                bases.append(entry)
            elif colon and not group.startswith("override") and group.strip() != "experiment":
                groups[group.strip()] = (option.strip(), comment)
    return groups, bases


def _options(lines: list[str]) -> list[tuple[str, str, str]]:
    """(dotted key, value as written, comment) of each key outside ``defaults``, ``hydra`` and ``command``."""
    found, parents = [], []  # parents: (indent, key) of the enclosing sections
    skipping = False
    for line in lines:
        match = KEY.match(line)
        if not match or line.lstrip().startswith("#"):
            continue
        indent, key = len(match.group("indent")), match.group("key")
        parents = [(i, k) for i, k in parents if i < indent]
        if not parents:
            skipping = key in ("defaults", "hydra", "command")
        value, comment = _split_comment(match.group("rest"))
        if not skipping:
            found.append((".".join([k for _, k in parents] + [key]), value, comment))
        parents.append((indent, key))
    return found


def _split_comment(text: str) -> tuple[str, str]:
    """(value, comment) of the text after a key's colon: the comment starts at a ``#`` outside quotes after a space."""
    quote = None
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].strip(), text[i + 1:].strip()
    return text.strip(), ""


def _experiments(command: str) -> list[tuple[str, str]]:
    """(name, first line of its header comment) of each ready experiment whose ``command`` is ``command``."""
    found = []
    for path in sorted((CONF / "experiment").glob("*.yaml")):
        lines = path.read_text().splitlines()
        owner = next((_split_comment(m.group("rest"))[0] for line in lines
                      if (m := KEY.match(line)) and m.group("key") == "command" and not m.group("indent")), None)
        if owner == command:
            text = " ".join(line.lstrip("# ").strip() for line in _header(lines))
            found.append((path.stem, _first_sentence(text)))
    return found


def _first_sentence(text: str, limit: int = 100) -> str:
    sentence = re.split(r"(?<=\.)\s+(?=[A-Z])", " ".join(text.split()), maxsplit=1)[0]
    return sentence if len(sentence) <= limit else sentence[:limit].rsplit(" ", 1)[0] + " ..."


def _row(left: str, right: str, width: int = 30) -> str:
    if not right:
        return f"  {left}"
    if len(left) > width - 1:
        return f"  {left}\n  {'':<{width}}{right}"
    return f"  {left:<{width}}{right}"
