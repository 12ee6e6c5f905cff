"""Losses of the training stages. Pretraining: next-token cross-entropy over packed blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of logits (bsz, seqlen, vocab) against targets (bsz, seqlen), in fp32.

    Targets equal to `ignore_index` (masked prompt tokens in SFT) do not count.
    """
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)


def pretrain_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """A packed block of seq_len + 1 tokens: predict tokens[1:] from tokens[:-1].

    Returns the loss and the number of tokens it was computed on (for tokens/s).
    """
    tokens = batch["tokens"].long()  # (bsz, seq_len + 1)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (bsz, seq_len) each
    return causal_lm_loss(model(inputs), targets), targets.numel()
