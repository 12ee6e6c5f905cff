"""Rejection sampling fine-tuning (Llama 2, section 3.2.3).

Each round the newest policy samples K replies per prompt; the combined reward picks the best;
the kept answer of a prompt is the best over all rounds so far (the paper's fix for regressions
between rounds); the policy is then fine-tuned on the kept answers with the SFT loss.
"""

from __future__ import annotations

import time

import torch

from corral import tracking
from corral.data.formats import prompt_messages
from corral.data.sft import encode_dialog, packed_rows
from corral.engine import SamplingParams
from corral.rlhf.actors import PolicyActor, RewardActor, RoleGroup
from corral.rlhf.config import RejectionSamplingConfig
from corral.rlhf.generators import Rollouts
from corral.rlhf.rollout import correct, sample_and_score
from corral.tokenizer import Tokenizer


def rs_roles(cfg: RejectionSamplingConfig, policy: str, helpful: str, safety: str) -> dict[str, tuple]:
    return {
        "policy": (PolicyActor, (policy, cfg.deepspeed, cfg.optim, cfg.micro_batch_size)),
        "helpful": (RewardActor, (helpful,)),
        "safety": (RewardActor, (safety,)),
    }


def rejection_sampling(cfg: RejectionSamplingConfig, group: RoleGroup, rollouts: Rollouts, tokenizer: Tokenizer,
                       prompts: list[dict], run_id: str) -> list[dict]:
    """All rounds, each logged to the run; returns the kept answers as SFT records (the dialogs the
    policy was last fine-tuned on)."""
    k, n = cfg.samples_per_prompt, len(prompts)
    best: list[tuple[float, str] | None] = [None] * n  # per prompt: (reward, reply), best of all rounds
    for rnd in range(cfg.rounds):
        params = SamplingParams(temperature=cfg.temperature, max_tokens=cfg.max_new_tokens,
                                seed=cfg.seed * 1_000_003 + rnd * n * k)
        s = sample_and_score(group, rollouts, tokenizer, [p for p in prompts for _ in range(k)], params,
                             cfg.safety_threshold)
        rewards = s.reward.view(n, k)  # (prompts, K): sample j of prompt i at i * K + j
        top = rewards.argmax(1)
        for i in range(n):
            candidate = (rewards[i, top[i]].item(), s.replies[i * k + top[i]])
            if best[i] is None or candidate[0] > best[i][0]:
                best[i] = candidate
        judged = [correct(p, reply) for p, (_, reply) in zip(prompts, best)]
        judged = [j for j in judged if j is not None]
        metrics = {"sample_reward_mean": rewards.mean().item(), "sample_reward_max": rewards.max(1).values.mean().item(),
                   "best_minus_mean": (rewards.max(1).values - rewards.mean(1)).mean().item(),
                   "kept_reward_mean": sum(b[0] for b in best) / n}
        if judged:
            metrics["kept_accuracy"] = sum(judged) / len(judged)
        kept = [{"messages": prompt_messages(p["prompt"]) + [{"role": "assistant", "content": reply}]}
                for p, (_, reply) in zip(prompts, best)]
        metrics["sft_loss"] = finetune(cfg, group, tokenizer, kept)
        t0 = time.perf_counter()
        rollouts.sync()  # the next round (and the held-out replies) sample the fine-tuned policy
        metrics["time_sync_s"] = time.perf_counter() - t0
        tracking.log_metrics(run_id, metrics, step=rnd)
        print(f"rejection sampling round {rnd}: " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
    return kept


def finetune(cfg: RejectionSamplingConfig, group: RoleGroup, tokenizer: Tokenizer, kept: list[dict]) -> float:
    """`epochs` passes of the SFT loss over the kept answers, packed; the mean loss of the last pass."""
    columns = packed_rows([encode_dialog(tokenizer, r["messages"]) for r in kept], cfg.seq_len)
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.epochs):
        order, losses = torch.randperm(len(columns["labels"]), generator=gen), []
        for i in range(0, len(order), cfg.micro_batch_size):
            rows = order[i:i + cfg.micro_batch_size]
            batch = {k: v[rows] for k, v in columns.items()}
            losses.append(group.call("policy", "train_sft", batch, doing="fine-tuning"))
    return sum(losses) / len(losses)
