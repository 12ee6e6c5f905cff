"""Every training loss of the recipe, in one place, each with its formula.

- next-token (pretraining): mean cross-entropy `-log p(x_{t+1} | x_{<=t})` over every position;
- answer-only SFT: the same, over answer tokens only (prompt and padding masked);
- margin ranking (reward models): `-log sigmoid(r(x, y_c) - r(x, y_r) - m(rating))`;
- PPO policy: the clipped surrogate `-E[min(r A, clip(r, 1-eps, 1+eps) A)]`, r = pi / pi_old;
- PPO value: the clipped value loss `0.5 E[max((v - R)^2, (v_old + clip(v - v_old) - R)^2)]`;
- KL: the per-token penalty estimate `log pi(a) - log pi_ref(a)` and Schulman's k3 diagnostic.

The stage losses take `(model, batch)` and return `(loss, tokens it covers)`, the signature
`corral.train.loop.TrainJob` trains with. Per-token RL tensors are (bsz, T) over label positions:
position t holds the token at t + 1, and `mask` is 1 on response tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from corral.data.sft import IGNORE, packed_layout

# The paper's table 28: margin by rating. "none" is the plain binary ranking loss.
MARGINS: dict[str, dict[str, float]] = {
    "large": {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0, "negligibly_better": 0.0},
    "small": {"significantly_better": 1.0, "better": 2 / 3, "slightly_better": 1 / 3, "negligibly_better": 0.0},
    "none": {"significantly_better": 0.0, "better": 0.0, "slightly_better": 0.0, "negligibly_better": 0.0},
}
RATINGS = tuple(MARGINS["large"])


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (all of them, or along `dim`)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


# -- language modelling ----------------------------------------------------------------------------

def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """Mean cross-entropy of logits (bsz, seqlen, vocab) against targets (bsz, seqlen), in fp32.

    Targets equal to `ignore_index` (masked prompt tokens in SFT) do not count.
    """
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)


def pretrain_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Next-token loss on a packed block of seq_len + 1 tokens: predict tokens[1:] from tokens[:-1]."""
    tokens = batch["tokens"].long()  # (bsz, seq_len + 1)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (bsz, seq_len) each
    return causal_lm_loss(model(inputs), targets), targets.numel()


def sft_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Answer-only SFT: mean cross-entropy over the answer tokens of a packed batch (`labels` is
    IGNORE elsewhere). Logits are computed at the answer positions only, and with the rows'
    `positions` (when the batch has them) each dialog attends only to itself."""
    labels = batch["labels"].long()  # (bsz, seq_len), IGNORE outside answers
    answers = labels != IGNORE
    logits = model(batch["input_ids"].long(), packed_layout(batch.get("positions"), answers))  # (n answers, vocab)
    return F.cross_entropy(logits.float(), labels[answers]), int(answers.sum())


# -- reward models ---------------------------------------------------------------------------------

def margin_of(ratings: Sequence[str], margin: str) -> torch.Tensor:
    """The margin m(rating) of each pair under the "large", "small" or "none" setting."""
    if margin not in MARGINS:
        raise ValueError(f"unknown margin setting {margin!r}; choose one of {', '.join(MARGINS)}")
    try:
        return torch.tensor([MARGINS[margin][r] for r in ratings], dtype=torch.float32)
    except KeyError as e:
        raise ValueError(f"unknown rating {e.args[0]!r}; expected one of {', '.join(RATINGS)}") from None


def ranking_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected - margin) over pairs, in fp32."""
    return -F.logsigmoid(chosen.float() - rejected.float() - margin.float()).mean()


def reward_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """The ranking loss over every pair of a batch of prompt rows (`corral.train.reward.encode_pairs`).

    Columns are padded to the widest row of the whole set; the batch is cut to its own widest
    (exact: each answer sees only the prompt and itself, and rewards are read at its last token).
    """
    ends = batch["ends"].long()
    width = int(ends.max())  # sync: the batch's width, read on the host
    rewards = model(batch["tokens"][:, :width].long(), ends, batch["branches"][:, :width])  # (bsz, answers)
    real = batch["is_pair"].bool()
    chosen, rejected = (rewards.gather(1, batch[k].long())[real] for k in ("chosen", "rejected"))
    return ranking_loss(chosen, rejected, batch["margin"][real]), int(ends.max(1).values.sum())


# -- PPO and KL ------------------------------------------------------------------------------------

def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate -E[min(r A, clip(r, 1-eps, 1+eps) A)], r = pi / pi_old; and the
    fraction of tokens where the clipped term was the one taken."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip, 1 + clip) * advantages
    loss = masked_mean(-torch.min(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped < unclipped).float(), mask)
    return loss, clip_fraction


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> torch.Tensor:
    """0.5 * E[max((v - R)^2, (v_old + clip(v - v_old, -eps, eps) - R)^2)]: the critic may not move
    a value more than `clip` from the one it predicted at rollout time and profit from it."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate log pi(a_t) - log pi_ref(a_t) at the sampled tokens (bsz, T).

    Its expectation under pi is the exact KL; zero outside the response.
    """
    return (logprobs - ref_logprobs) * mask


def approx_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(pi_old || pi): E[(r - 1) - log r], never negative."""
    log_ratio = logprobs - old_logprobs
    return masked_mean(torch.exp(log_ratio) - 1 - log_ratio, mask)

