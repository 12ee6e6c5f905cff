"""SFT encoding: Meta's chat layout, loss only on answers, Ghost Attention, packing, the SFT loss."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from corral.config import ModelConfig
from corral.data.sft import IGNORE, encode_dialog, encode_record, gatt, pack, packed_layout
from corral.train.losses import sft_loss
from corral.data.tasks import TaskSuite
from corral.model import Transformer
from corral.tokenizer import B_INST, E_INST, ChatFormatError

DIALOG = [
    {"role": "system", "content": "Always answer in upper case."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "Reverse the letters: c a t"},
    {"role": "assistant", "content": "T A C"},
]


def masked_spans(ids, mask):
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


def test_prompt_tokens_match_serving_and_loss_covers_answers_and_eos(tokenizer):
    ids, mask = encode_dialog(tokenizer, DIALOG)
    # The prompt of the last turn tokenises exactly as serving's encode_chat does.
    served = tokenizer.encode_chat(DIALOG[:-1])
    assert ids[: len(served)] == served
    assert all(mask[len(served):])  # the final answer and its EOS
    # Meta's layout, token for token: every turn is its own BOS ... EOS encoding.
    expected = tokenizer.encode(f"{B_INST} <<SYS>>\nAlways answer in upper case.\n<</SYS>>\n\nWhat is 12 + 30? "
                                f"{E_INST} 42 ", bos=True, eos=True) \
        + tokenizer.encode(f"{B_INST} Reverse the letters: c a t {E_INST} T A C ", bos=True, eos=True)
    assert ids == expected
    spans = masked_spans(ids, mask)
    assert len(spans) == 2
    assert [tokenizer.decode(s).strip() for s in spans] == ["42", "T A C"]
    assert all(s[-1] == tokenizer.eos_id for s in spans)
    assert sum(mask) == sum(len(s) for s in spans)


def test_bad_dialogs_are_rejected(tokenizer):
    with pytest.raises(ChatFormatError, match="end with an assistant"):
        encode_dialog(tokenizer, DIALOG[:-1])
    with pytest.raises(ChatFormatError, match="alternate"):
        encode_dialog(tokenizer, [DIALOG[1], DIALOG[1], DIALOG[2]])
    with pytest.raises(ValueError, match="loss_turns"):
        encode_dialog(tokenizer, DIALOG, loss_turns="first")


def test_gatt_keeps_the_instruction_in_the_first_turn_only_and_trains_the_last(tokenizer):
    instruction = DIALOG[0]["content"]
    sampled = [DIALOG[0]] + [{**m, "content": f"{instruction} {m['content']}"} if m["role"] == "user" else m
                             for m in DIALOG[1:]]  # as sampled: the instruction on every user turn
    dialog = gatt(sampled)
    assert dialog == DIALOG
    ids, mask = encode_record(tokenizer, {"messages": sampled, "gatt": True})
    text = tokenizer.decode(ids)
    assert text.count(instruction) == 1 and text.index(instruction) < text.index(E_INST)
    bos = [i for i, t in enumerate(ids) if t == tokenizer.bos_id]
    assert len(bos) == 2
    assert not any(mask[: bos[1]])  # zero loss on the earlier turn, its answer included
    assert [tokenizer.decode(s).strip() for s in masked_spans(ids, mask)] == ["T A C"]
    # without the flag, every answer is trained
    assert len(masked_spans(*encode_record(tokenizer, {"messages": sampled}))) == 2


def test_packing_never_crosses_dialogs(tokenizer):
    records = TaskSuite(seed=0).sft_dialogs(200)
    examples = [encode_record(tokenizer, r) for r in records]
    seq_len = 96
    packed = pack(examples, seq_len)
    inputs, labels, positions = packed["input_ids"], packed["labels"], packed["positions"]
    assert inputs.shape == labels.shape == positions.shape and inputs.shape[1] == seq_len
    kept = [e for e in examples if len(e[0]) <= seq_len + 1]
    assert packed["dropped"] == len(examples) - len(kept)
    # Rebuild every row's dialogs from the positions (0 starts one); the row's last token, past the
    # inputs, is the last label when a dialog ends there. Padding is one-token runs of pad id 0.
    rows = np.concatenate([inputs, np.where(labels[:, -1:] != IGNORE, labels[:, -1:], 0)], axis=1)
    masks = {tuple(ids): mask for ids, mask in kept}
    found, owner, answer = [], np.full(rows.shape, -1), np.zeros(rows.shape, dtype=bool)
    for r in range(len(rows)):
        starts = [t for t in range(seq_len) if positions[r, t] == 0] + [seq_len + 1]
        for a, b in zip(starts, starts[1:]):
            ids = tuple(rows[r, a:b].tolist())
            if b == seq_len + 1 and ids[-1] == 0:  # the row ends in padding
                ids = ids[:-1]
            if ids == (0,) or not ids:
                continue
            assert list(positions[r, a:a + len(ids)][:seq_len - a]) == list(range(len(ids)))[:seq_len - a]
            owner[r, a:a + len(ids)], answer[r, a:a + len(ids)] = len(found), masks[ids]
            found.append(ids)
    assert sorted(found) == sorted(tuple(ids) for ids, _ in kept)  # every dialog whole, exactly once
    # Best fit: a row opens only when no open row has room, so at most one row is half empty or more.
    free = (seq_len + 1) - np.array([(owner[i] >= 0).sum() for i in range(len(rows))])
    assert (free >= (seq_len + 1) / 2).sum() <= 1
    r, t = np.nonzero(labels != IGNORE)
    assert len(r) == sum(sum(m) for _, m in kept)  # every answer token is a label exactly once
    assert (owner[r, t] == owner[r, t + 1]).all()  # a loss position predicts a token of its own dialog
    assert answer[r, t + 1].all()  # ... and that token is an answer token, never a prompt token
    first_tokens = inputs == tokenizer.bos_id
    assert not (labels[:, :-1][first_tokens[:, 1:]] != IGNORE).any()  # BOS is never a label


def test_pack_fills_the_row_with_the_least_room_left():
    # Room for 9 tokens a row. In order, 6 | 5 + 3 | 4 would take three rows; best fit puts 3 after
    # the 6 (room 3) and 4 after the 5 (room 4): two full rows, each dialog whole and in place.
    examples = [([1] + [n] * (n - 1), [False] * n) for n in (6, 5, 3, 4)]
    packed = pack(examples, seq_len=8)
    assert [row[:8] for row in packed["input_ids"].tolist()] == [[1, 6, 6, 6, 6, 6, 1, 3], [1, 5, 5, 5, 5, 1, 4, 4]]
    assert packed["positions"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1], [0, 1, 2, 3, 4, 0, 1, 2]]


def test_a_packed_dialog_is_seen_as_if_alone():
    # Three dialogs of random tokens packed in one row: with the packing's positions each dialog's
    # logits are those of the dialog on its own (attention never reaches another dialog, positions
    # restart), and without them the later dialogs' logits change.
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50,
                                    multiple_of=16, max_seq_len=32)).init_weights(seed=0).eval()
    dialogs = [torch.randint(3, 50, (n,)).tolist() for n in (7, 11, 5)]
    packed = pack([(d, [True] * len(d)) for d in dialogs], seq_len=24)
    row, positions = torch.from_numpy(packed["input_ids"]), torch.from_numpy(packed["positions"])
    with torch.no_grad():
        together = model(row, packed_layout(positions))[0]
        unmasked = model(row)[0]
        start = 0
        for d in dialogs:
            n = min(len(d), 24 - start)
            alone = model(torch.tensor([d]))[0, :n]
            torch.testing.assert_close(together[start:start + n], alone, atol=1e-5, rtol=1e-5)
            if start:
                assert (unmasked[start:start + n] - alone).abs().max() > 1e-3
            start += n


def test_pack_drops_dialogs_longer_than_a_row():
    short, long = ([1, 5, 6, 2], [False, False, True, True]), ([1] + [7] * 20, [False] + [True] * 20)
    packed = pack([short, long, short], seq_len=8)
    assert packed["dropped"] == 1
    assert packed["input_ids"].tolist() == [[1, 5, 6, 2, 1, 5, 6, 2]]
    assert packed["labels"].tolist() == [[IGNORE, 6, 2, IGNORE, IGNORE, 6, 2, IGNORE]]


class FixedLogits(nn.Module):
    """A stand-in language model whose logits are given by hand."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, tokens, layout):
        logits = self.logits[:, : tokens.shape[1]]
        return logits if layout.logits_at is None else logits[layout.logits_at]


def test_sft_loss_on_a_hand_built_batch():
    # vocab 5; every position puts logit 2 on token 0 and 0 elsewhere.
    logits = torch.zeros(2, 4, 5)
    logits[..., 0] = 2.0
    batch = {
        "input_ids": torch.tensor([[1, 8, 8, 8], [1, 8, 8, 8]]),
        # three answer positions: targets 0, 3 and 0; prompt and padding positions are IGNORE
        "labels": torch.tensor([[IGNORE, 0, 3, IGNORE], [IGNORE, IGNORE, IGNORE, 0]]),
    }
    loss, n = sft_loss(FixedLogits(logits), batch)
    # CE(target 0) = -log(e^2 / (e^2 + 4)) = log(1 + 4 e^-2) = 0.432653
    # CE(target 3) = -log(1 / (e^2 + 4)) = log(e^2 + 4) = 2.432653
    expected = (2 * 0.4326529029917915 + 2.4326529029917916) / 3
    assert n == 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx((2 * math.log1p(4 * math.exp(-2)) + math.log(math.exp(2) + 4)) / 3)
    # an unmasked loss would differ: the masking is what makes the number
    everything = {**batch, "labels": torch.zeros(2, 4, dtype=torch.long)}
    assert sft_loss(FixedLogits(logits), everything)[0].item() == pytest.approx(0.4326529, rel=1e-5)
