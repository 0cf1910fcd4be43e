"""Instruction data (Alpaca-style JSON: instruction, input, output) and the prompt template that turns
a row into a prompt and a response.

The prompt is everything the model reads before the answer; the response is the answer followed by
the end-of-sequence token. Supervised fine-tuning scores the response tokens only, and the preference
methods compare responses to the same prompt, so both read prompts through ``render_prompt``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lm_lightning.errors import UserError

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_TEMPLATE_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
FIELDS = ("instruction", "input", "output")


@dataclass(frozen=True)
class Instruction:
    instruction: str
    input: str
    output: str


def render_prompt(row: Instruction, template: str = PROMPT_TEMPLATE,
                  template_with_input: str = PROMPT_TEMPLATE_WITH_INPUT) -> str:
    """The text the model reads before its answer (the input block only when the row has one)."""
    if row.input.strip():
        return template_with_input.format(instruction=row.instruction, input=row.input)
    return template.format(instruction=row.instruction)


def load_instructions(path: str | Path) -> list[Instruction]:
    """Rows of an Alpaca-style file: a JSON list of objects, or JSON lines, each with string fields
    ``instruction`` and ``output`` (``input`` optional). A malformed file is one error naming the
    file, the row and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"instruction file not found: {path} (pass data_file=<an Alpaca-style .json or .jsonl file>)")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"instruction file {path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
                        "expected a list of {instruction, input, output} objects") from err
    if not isinstance(records, list) or not records:
        raise UserError(f"instruction file {path} holds no rows: expected a non-empty JSON list of "
                        "{instruction, input, output} objects")
    rows = []
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise UserError(f"instruction file {path}, row {number}: expected an object with instruction, input "
                            f"and output, got {type(record).__name__}")
        missing = [field for field in ("instruction", "output") if field not in record]
        if missing:
            raise UserError(f"instruction file {path}, row {number}: missing field {', '.join(missing)} "
                            "(every row needs instruction and output; input is optional)")
        wrong = [field for field in FIELDS if field in record and not isinstance(record[field], str)]
        if wrong:
            raise UserError(f"instruction file {path}, row {number}: field {', '.join(wrong)} must be a string")
        rows.append(Instruction(record["instruction"], record.get("input", ""), record["output"]))
    return rows
