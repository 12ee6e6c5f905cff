"""The numbers of Llama 2's RLHF (section 3.2.3), as pure tensor functions with hand-checked tests.

- `combined_reward`: one gate used by rejection sampling and PPO alike. The safety score decides
  on prompts tagged unsafe and whenever it is low (the answer itself looks unsafe), else the
  helpfulness score decides.
- `ppo_token_rewards`: `WHITEN(LOGIT(R_c))` at the last response token minus `beta * KL` per token.
- `gae`, `entropy` and `gather_logprobs`. The PPO and KL losses are in `corral.train.losses`.

Every per-token tensor is (bsz, T) over "label positions": position t holds the token at t + 1 of
the sequence, so logits[:, :-1] line up with it; `mask` is 1 on response tokens, 0 on prompt and
padding.
"""

from __future__ import annotations

import torch

from corral.train.losses import masked_mean

SAFETY_THRESHOLD = 0.15  # the paper's: below it the answer is judged by safety even on a safe prompt


def logit(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """log(p / (1 - p)), with p clamped to [eps, 1 - eps] so a saturated score stays finite."""
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the (masked) entries; population std, as TRL and OpenRLHF.

    shift_mean=False keeps the mean and only rescales (used nowhere by default; here for parity).
    """
    mask = torch.ones_like(x) if mask is None else mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def combined_reward(helpful: torch.Tensor, safety: torch.Tensor, unsafe: torch.Tensor,
                    threshold: float = SAFETY_THRESHOLD) -> torch.Tensor:
    """R_c: the safety probability where the prompt is tagged unsafe or safety < threshold, else the
    helpfulness probability. All inputs (bsz,); scores are sigmoid probabilities in (0, 1)."""
    return torch.where(unsafe.bool() | (safety < threshold), safety, helpful)


def gate_rate(safety: torch.Tensor, unsafe: torch.Tensor, threshold: float = SAFETY_THRESHOLD) -> float:
    """Share of the prompts not tagged unsafe whose R_c the safety gate decided (R_s < threshold).

    High means the safety model scores ordinary answers as unsafe, and RLHF optimises the safety
    score where it should optimise helpfulness. 0.0 when every prompt is tagged unsafe.
    """
    untagged = ~unsafe.bool()
    return (safety[untagged] < threshold).float().mean().item() if untagged.any() else 0.0


def ppo_token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token rewards (bsz, T): -beta * KL on every response token, plus the sequence score
    (already WHITEN(LOGIT(R_c)), shape (bsz,)) on its last response token."""
    rewards = -beta * kl * mask
    last = mask.long().cumsum(1).argmax(1)  # index of the last response token, (bsz,)
    return rewards.scatter_add(1, last[:, None], score[:, None].to(rewards.dtype))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens; returns (advantages, returns).

    The value after the last response token is 0 (the episode ends there). rewards, values, mask
    are (bsz, T); prompt and padding positions come out 0.
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the next-token distributions (bsz, T, vocab) over response positions."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return masked_mean(-(logp.exp() * logp).sum(-1), mask)


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log pi(token) of each sequence's next token: logits (bsz, L, vocab), tokens (bsz, L) -> (bsz, L-1)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (bsz, L-1, vocab)
    return logp.gather(2, tokens[:, 1:, None]).squeeze(2)
