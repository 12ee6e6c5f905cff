"""Validated readers and a writer for the alignment data formats of DESIGN.md (JSONL or Parquet).

- sft: `{"messages": [{"role", "content"}...], "gatt": bool = false}`, roles alternating user /
  assistant after an optional system message, ending with the assistant.
- preferences: `{"prompt": str | messages, "chosen": str, "rejected": str, "rating": ..., "safety": bool}`.
- rl_prompts: `{"prompt": str | messages, "safety": bool}`.
- eval: `{"family": str, "messages": [...ending with user], "answer": str | null, "unsafe": bool | null}`.
- guard: `{"messages": [...], "unsafe": bool, "categories": [str]}`: the last turn (the user's or
  the assistant's) is the one judged; an unsafe turn names its categories (e.g. `["O3"]`).

Every record is checked when read; the first bad one raises `DataFormatError` naming the file, the
line (the row, 1-based, for Parquet), the field and what was expected. Extra fields are allowed.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from corral.tokenizer import chat_turns

RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")


class DataFormatError(ValueError):
    """A record that does not follow its format: names the file, line and field."""


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


def _check_prompt_dialog(messages: list[Message]) -> list[Message]:
    chat_turns([m.model_dump() for m in messages])  # alternation, reserved tags, ends with the user
    return messages


def _check_prompt(prompt: str | list[Message]) -> str | list[Message]:
    return prompt if isinstance(prompt, str) else _check_prompt_dialog(prompt)


PromptDialog = Annotated[list[Message], Field(min_length=1), AfterValidator(_check_prompt_dialog)]
Prompt = Annotated[str | list[Message], AfterValidator(_check_prompt)]


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")


class SFTRecord(_Record):
    messages: list[Message] = Field(min_length=2)
    gatt: bool = False  # Ghost Attention: the system instruction held for every turn

    @field_validator("messages")
    @classmethod
    def _dialog(cls, messages: list[Message]) -> list[Message]:
        if messages[-1].role != "assistant":
            raise ValueError("an SFT dialog must end with an assistant message")
        _check_prompt_dialog(messages[:-1])
        return messages


class PreferenceRecord(_Record):
    prompt: Prompt
    chosen: str = Field(min_length=1)
    rejected: str = Field(min_length=1)
    rating: Literal[RATINGS]  # type: ignore[valid-type]
    safety: bool = False


class RLPromptRecord(_Record):
    prompt: Prompt
    safety: bool = False  # tagged unsafe: PPO rewards it with the safety reward model
    answer: str | None = None  # the exact right reply, if there is one (held-out exact match)
    refuse: bool | None = None  # should the reply decline? (held-out refusal rates)


class EvalRecord(_Record):
    family: str
    messages: PromptDialog
    answer: str | None = None  # exact-match items
    unsafe: bool | None = None  # safety items: should the reply be a refusal?


class GuardRecord(_Record):
    messages: list[Message] = Field(min_length=1)
    unsafe: bool
    categories: list[str] = []

    @field_validator("messages")
    @classmethod
    def _dialog(cls, messages: list[Message]) -> list[Message]:
        _check_prompt_dialog(messages[:-1] if messages[-1].role == "assistant" else messages)
        return messages

    @model_validator(mode="after")
    def _categories_iff_unsafe(self) -> "GuardRecord":
        if self.unsafe != bool(self.categories):
            raise ValueError("an unsafe turn names at least one category and a safe one none: "
                             f"unsafe is {self.unsafe}, categories {self.categories}")
        return self


FORMATS: dict[str, type[_Record]] = {
    "sft": SFTRecord, "preferences": PreferenceRecord, "rl_prompts": RLPromptRecord, "eval": EvalRecord,
    "guard": GuardRecord,
}


def prompt_messages(prompt: str | list) -> list[dict]:
    """A record's prompt as a dialog ending with the user's turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [m if isinstance(m, dict) else m.model_dump() for m in prompt]


def _describe(e: ValidationError) -> str:
    err = e.errors()[0]
    field = ".".join(str(x) for x in err["loc"]) or "record"
    msg = err["msg"].removeprefix("Value error, ")
    return f"field {field!r}: {msg}"


def _rows(path: str) -> Iterator[tuple[int, object]]:
    """(line number, parsed row) of a JSONL or Parquet file, local or on any pyarrow filesystem."""
    import pyarrow.fs as pafs

    if "://" in path:
        fs, inner = pafs.FileSystem.from_uri(path)
    else:
        fs, inner = pafs.LocalFileSystem(), os.path.abspath(path)
    if fs.get_file_info(inner).type != pafs.FileType.File:
        raise FileNotFoundError(f"{path}: no such data file")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        with fs.open_input_file(inner) as f:
            for i, row in enumerate(pq.read_table(f).to_pylist(), start=1):
                yield i, {k: v for k, v in row.items() if v is not None}
        return
    if not path.endswith((".jsonl", ".json")):
        raise DataFormatError(f"{path}: unknown data file type; use .jsonl or .parquet")
    with fs.open_input_stream(inner) as f:
        for i, line in enumerate(f.read().decode("utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataFormatError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None


def read_records(path: str | os.PathLike, kind: str) -> list[dict]:
    """All records of a JSONL or Parquet file in format `kind`, validated; raises on the first bad one."""
    if kind not in FORMATS:
        raise ValueError(f"unknown data format {kind!r}; choose one of {', '.join(FORMATS)}")
    model, path = FORMATS[kind], str(path)
    out = []
    for line, row in _rows(path):
        if not isinstance(row, dict):
            raise DataFormatError(f"{path}:{line}: a {kind} record must be a JSON object")
        try:
            out.append(model.model_validate(row).model_dump(exclude_none=True))
        except ValidationError as e:
            raise DataFormatError(f"{path}:{line}: {_describe(e)} (format {kind!r}, see DESIGN.md)") from None
    if not out:
        raise DataFormatError(f"{path}: holds no {kind} records")
    return out


def write_records(path: str | os.PathLike, records: list[dict]) -> Path:
    """Write records as JSONL (or Parquet when the name ends with .parquet)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), p)
    else:
        p.write_text("".join(json.dumps(r) + "\n" for r in records))
    return p


def read_all(paths: list[str], kind: str) -> list[dict]:
    """The records of every file in `paths`, in order (see `read_records`)."""
    return [r for path in paths for r in read_records(path, kind)]


def held_out(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded random `fraction` of the records (at least one) held out."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n = max(1, round(fraction * len(records)))
    if n >= len(records):
        raise ValueError(f"{len(records)} records are too few to hold out {fraction:.0%} for validation")
    return [records[i] for i in order[n:]], [records[i] for i in order[:n]]
