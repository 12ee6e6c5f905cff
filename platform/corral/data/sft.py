"""SFT examples: dialogs -> token ids with a loss mask over the answers, Ghost Attention, packing.

The layout is Meta's chat template, token for token: each finished turn is
BOS + encode("[INST] {user} [/INST] {answer} ") + EOS, the system prompt folded into the first user
message. The prompt part of a turn tokenises exactly as `Tokenizer.encode_chat` (serving) does,
because every piece of the answer starts after a space: SentencePiece never merges across it.
The loss covers the answer tokens and the EOS that ends them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np
import torch

from corral.model import Layout
from corral.tokenizer import B_INST, E_INST, ChatFormatError, Tokenizer, chat_turns

IGNORE = -100  # label of positions without loss (torch's cross_entropy ignore_index)


def dialog_turns(messages: Sequence[dict]) -> list[tuple[str, str]]:
    """Validate a finished dialog (ending with the assistant) and fold it into (user, answer) turns."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ChatFormatError("a training dialog must end with an assistant message")
    turns = chat_turns(messages[:-1])
    return turns[:-1] + [(turns[-1][0], messages[-1]["content"].strip())]


def encode_dialog(tokenizer: Tokenizer, messages: Sequence[dict],
                  loss_turns: str = "all") -> tuple[list[int], list[bool]]:
    """Token ids of a finished dialog and, per token, whether the loss predicts it.

    loss_turns: "all" trains on every answer, "last" only on the final one (Ghost Attention).
    """
    if loss_turns not in ("all", "last"):
        raise ValueError(f"loss_turns must be 'all' or 'last', not {loss_turns!r}")
    turns = dialog_turns(messages)
    ids: list[int] = []
    mask: list[bool] = []
    for i, (user, answer) in enumerate(turns):
        prompt = tokenizer.encode(f"{B_INST} {user} {E_INST}", bos=True)
        turn = tokenizer.encode(f"{B_INST} {user} {E_INST} {answer} ", bos=True, eos=True)
        if turn[: len(prompt)] != prompt:  # cannot happen with a Llama-style tokenizer; guard anyway
            raise ChatFormatError(f"turn {i}: the answer changes the tokens of its prompt; the tokenizer "
                                  f"must split on whitespace (train it with corral.tokenizer.train_tokenizer)")
        trained = loss_turns == "all" or i == len(turns) - 1
        ids += turn
        mask += [False] * len(prompt) + [trained] * (len(turn) - len(prompt))
    return ids, mask


def gatt(messages: Sequence[dict]) -> list[dict]:
    """Ghost Attention (Llama 2, section 3.3): the training form of a dialog sampled with a system
    instruction attached to every user message.

    The input is either that sampling form (a system message whose text also starts every user
    message) or already a system message followed by plain turns. The output keeps the instruction
    only in the first turn, as the system prompt; encode it with loss_turns="last" so earlier
    turns, which were sampled with the instruction in view, carry no loss.
    """
    if not messages or messages[0].get("role") != "system":
        raise ChatFormatError("a Ghost Attention dialog must start with the system instruction")
    instruction = messages[0]["content"].strip()
    out = [dict(messages[0])]
    for m in messages[1:]:
        content = m["content"].strip()
        if m["role"] == "user" and content.startswith(instruction):
            content = content[len(instruction):].strip()
        out.append({"role": m["role"], "content": content})
    return out


def encode_record(tokenizer: Tokenizer, record: dict, use_gatt: bool = True) -> tuple[list[int], list[bool]]:
    """An SFT record (formats.SFTRecord) as ids + loss mask, with Ghost Attention where marked."""
    if use_gatt and record.get("gatt"):
        return encode_dialog(tokenizer, gatt(record["messages"]), loss_turns="last")
    return encode_dialog(tokenizer, record["messages"])


def pack(examples: Sequence[tuple[list[int], list[bool]]], seq_len: int, pad_id: int = 0) -> dict:
    """Pack whole dialogs into rows of `seq_len` inputs with next-token labels, best fit.

    Each dialog goes into the open row it leaves least room in (the oldest of equals), or opens a
    new row: rows come out fuller than in-order packing, so SFT takes fewer steps for the same
    dialogs (docs/design-notes.md, "Packing"). Rows keep the order they were opened in; a row's
    dialogs keep the examples' order.

    A dialog is never split across rows: every answer sees its whole prompt. Labels are the next
    token where the mask says so, else IGNORE; a dialog's first token (its BOS) is never a label,
    so no loss position ever predicts a token of another dialog. Dialogs longer than a row are
    dropped (counted in `dropped`); the tail of a row is padding with no loss.
    `positions` gives each input token's position within its own dialog (0 starts one, padding is
    a run of one-token documents): `packed_layout` turns them into the model's layout, which keeps
    attention inside a dialog. Returns {"input_ids", "labels", "positions": (rows, seq_len) int64, "dropped": int}.
    """
    width = seq_len + 1  # a row's inputs plus the label of its last input
    rows: list[list[tuple[list[int], list[bool]]]] = []
    open_by_room: list[deque[int]] = [deque() for _ in range(width + 1)]  # row indices by free tokens
    dropped = 0
    for ex_ids, ex_mask in examples:
        need = len(ex_ids)
        if need > width:
            dropped += 1
            continue
        room = next((r for r in range(need, width + 1) if open_by_room[r]), None)
        if room is None:
            row, room = len(rows), width
            rows.append([])
        else:
            row = open_by_room[room].popleft()
        rows[row].append((ex_ids, ex_mask))
        open_by_room[room - need].append(row)
    tokens = np.full((len(rows), width), pad_id, dtype=np.int64)
    loss = np.zeros((len(rows), width), dtype=bool)
    positions = np.zeros((len(rows), width), dtype=np.int64)
    for r, dialogs in enumerate(rows):
        col = 0
        for ex_ids, ex_mask in dialogs:
            end = col + len(ex_ids)
            tokens[r, col:end] = ex_ids
            loss[r, col + 1:end] = ex_mask[1:]
            positions[r, col:end] = np.arange(len(ex_ids))
            col = end
    labels = np.where(loss[:, 1:], tokens[:, 1:], IGNORE)
    return {"input_ids": tokens[:, :-1], "labels": labels, "positions": positions[:, :-1], "dropped": dropped}


def packed_rows(examples: Sequence[tuple[list[int], list[bool]]], seq_len: int) -> dict:
    """`pack` as torch tensors, the batch columns `sft_loss` reads: input_ids, labels, positions."""
    packed = pack(examples, seq_len)
    return {k: torch.from_numpy(packed[k]) for k in ("input_ids", "labels", "positions")}


def document_mask(positions: torch.Tensor) -> torch.Tensor:
    """(bsz, 1, seqlen, seqlen) bool: causal attention that stays inside each packed document.

    Without it, a packed dialog's answer can attend to another dialog in the same row, and a tiny
    model copies letters from the wrong dialog (docs/design-notes.md, "Packing").
    """
    doc = torch.cumsum(positions == 0, dim=1)  # (bsz, seqlen): which document each token is in
    seqlen = positions.shape[1]
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=positions.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def packed_layout(positions: torch.Tensor | None, logits_at: torch.Tensor | None = None) -> Layout:
    """The model's layout for rows from `pack`: every dialog attends only to itself and its
    positions restart at 0, so it is seen as if alone, as at inference. Without `positions`
    (unpacked rows) the plain causal layout."""
    if positions is None:
        return Layout(logits_at=logits_at)
    positions = positions.long()
    return Layout(positions=positions, mask=document_mask(positions), logits_at=logits_at)
