"""A Llama Guard-style safety classifier: a Llama 2 model fine-tuned to say whether the last turn
of a conversation, the user's or the assistant's, is `safe` or `unsafe` under a taxonomy of
categories given in its prompt, and which categories it violates (Inan et al., 2023).

- Training data: `guard` records (`corral.data.formats`: a conversation, `unsafe`, `categories`),
  from files or the task suite's safety family (`TaskSuite.guard_examples`), turned into SFT
  dialogs by `guard_sft_record` and trained by the same SFT job as the chat model.
- Inference (`Guard.assess`): no sampling. The model scores each possible answer (`safe`, and
  `unsafe` with each one category) by its log-likelihood in one batched forward
  (`score_continuations`); the softmax over those answers gives the probability that the turn is
  unsafe and a score per category, which is what `/v1/moderations` reports and what a threshold
  turns into a decision.

The taxonomy travels with the checkpoint (`guard_categories` in corral.json), so serving asks the
question the guard was trained on.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from corral.checkpoint import WeightReader, load_model, load_tokenizer
from corral.data.sft import encode_dialog
from corral.data.tasks import UNSAFE_CATEGORIES
from corral.evaluate import score_continuations

SPEAKERS = {"user": "User", "assistant": "Agent"}  # Llama Guard's names for the two sides


def guard_prompt(messages: Sequence[dict], categories: dict[str, str]) -> str:
    """The question put to the guard about the last message of `messages` (system messages are
    the operator's: left out)."""
    judged = SPEAKERS[messages[-1]["role"]]
    lines = [f"Is the last {judged} turn unsafe? Categories:"]
    lines += [f"{code} {name}" for code, name in categories.items()]
    lines += [f"{SPEAKERS[m['role']]}: {m['content'].strip()}" for m in messages if m["role"] != "system"]
    return "\n".join(lines)


def verdict_text(unsafe: bool, categories: Sequence[str]) -> str:
    """The answer the guard is trained to give: `safe`, or `unsafe` and a line of category codes."""
    return "unsafe\n" + ",".join(categories) if unsafe else "safe"


def guard_sft_record(record: dict, categories: dict[str, str]) -> dict:
    """A `guard` record as the SFT dialog that teaches its verdict."""
    return {"messages": [{"role": "user", "content": guard_prompt(record["messages"], categories)},
                         {"role": "assistant", "content": verdict_text(record["unsafe"], record["categories"])}]}


@dataclass
class Verdict:
    """The guard's answer about one turn."""

    flagged: bool
    categories: list[str]  # codes of the violated categories (empty when not flagged)
    unsafe_score: float  # P(unsafe) among the guard's possible answers
    category_scores: dict[str, float]  # code -> P(unsafe, this category)

    def to_dict(self) -> dict:
        return {"flagged": self.flagged, "categories": self.categories, "unsafe_score": self.unsafe_score,
                "category_scores": self.category_scores}


class Guard:
    """A guard checkpoint, ready to judge conversations in batches."""

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 threshold: float = 0.5, batch_size: int = 16):
        self.model = load_model(path, dtype).to(device).eval()
        self.tokenizer = load_tokenizer(path)
        self.categories: dict[str, str] = WeightReader(path).metadata.get("guard_categories") or UNSAFE_CATEGORIES
        self.threshold, self.batch_size = threshold, batch_size
        self.answers = [verdict_text(False, [])] + [verdict_text(True, [c]) for c in self.categories]

    def _rows(self, messages: Sequence[dict]) -> list[tuple[list[int], list[int]]]:
        """(input, target) ids of every possible answer, encoded as SFT encoded them. A conversation
        longer than the guard's context loses its oldest turns, then the start of the judged one."""
        messages = [m for m in messages if m["role"] != "system"]  # the operator's, not judged
        if not messages:
            raise ValueError("the conversation to judge holds no user or assistant message")
        while True:
            prompt = {"role": "user", "content": guard_prompt(messages, self.categories)}
            rows = []
            for answer in self.answers:
                ids, trained = encode_dialog(self.tokenizer, [prompt, {"role": "assistant", "content": answer}])
                rows.append((ids[:-1], ids[len(ids) - sum(trained):]))
            if max(len(inp) for inp, _ in rows) <= self.model.config.max_seq_len:
                return rows
            if len(messages) > 1:
                messages = messages[1:]
            else:
                words = messages[0]["content"].split()
                if len(words) <= 1:
                    raise ValueError(f"the guard's context ({self.model.config.max_seq_len} tokens) cannot hold "
                                     f"its question and taxonomy; use a guard with a longer max_seq_len")
                messages = [{**messages[0], "content": " ".join(words[max(1, len(words) // 4):])}]

    def assess(self, conversations: Sequence[Sequence[dict]]) -> list[Verdict]:
        """A verdict on the last message of each conversation."""
        rows, n = [], len(self.answers)
        for messages in conversations:
            rows += self._rows(messages)
        scores = [lp for lp, _ in score_continuations(self.model, rows, self.batch_size)]
        verdicts = []
        for i in range(len(conversations)):
            lps = scores[i * n:(i + 1) * n]
            top = max(lps)
            probs = [math.exp(lp - top) for lp in lps]
            total = sum(probs)
            by_category = {code: p / total for code, p in zip(self.categories, probs[1:])}
            unsafe = 1 - probs[0] / total
            flagged = unsafe >= self.threshold
            named = sorted(c for c, p in by_category.items() if p >= self.threshold)
            categories = (named or [max(by_category, key=by_category.get)]) if flagged else []
            verdicts.append(Verdict(flagged, categories, unsafe, by_category))
        return verdicts


def guard_metrics(records: Sequence[dict], verdicts: Sequence[Verdict], categories: dict[str, str]) -> dict[str, float]:
    """Precision, recall and F1 of `unsafe` and of each category (a category counts as predicted
    when the turn is flagged with it), and accuracy, against the records' labels."""

    def prf(pred: list[bool], true: list[bool]) -> tuple[float, float, float]:
        tp = sum(p and t for p, t in zip(pred, true))
        precision = tp / sum(pred) if any(pred) else 0.0
        recall = tp / sum(true) if any(true) else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return precision, recall, f1

    out = {"accuracy": sum(v.flagged == r["unsafe"] for r, v in zip(records, verdicts)) / len(records)}
    groups = {"unsafe": ([v.flagged for v in verdicts], [r["unsafe"] for r in records])}
    for code in categories:
        if any(code in r["categories"] for r in records):
            groups[code] = ([code in v.categories for v in verdicts], [code in r["categories"] for r in records])
    for name, (pred, true) in groups.items():
        out[f"{name}_precision"], out[f"{name}_recall"], out[f"{name}_f1"] = prf(pred, true)
    return out
