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
from corral.rlhf.actors import PolicyActor, RewardActor, Role, RoleGroup, shard_rows
from corral.rlhf.config import RejectionSamplingConfig
from corral.rlhf.generators import Rollouts
from corral.rlhf.resume import StepState
from corral.rlhf.rollout import correct, sample_and_score
from corral.tokenizer import Tokenizer
from corral.train.losses import IGNORE


TRAINED = ("policy",)


def rs_roles(cfg: RejectionSamplingConfig, policy: str, helpful: str, safety: str) -> dict[str, Role]:
    """The policy (trained, a group of `resources.ranks.policy`) and the two frozen reward models
    (one actor each, or ZeRO-3 inference groups where `resources.ranks` names them)."""
    r, bf16 = cfg.resources, cfg.deepspeed.bf16
    return {
        "policy": Role(PolicyActor, (policy, cfg.deepspeed, cfg.optim, cfg.micro_batch_size), r.ranks_of("policy")),
        "helpful": Role(RewardActor, (helpful, bf16), r.group_of("helpful")),
        "safety": Role(RewardActor, (safety, bf16), r.group_of("safety")),
    }


def rejection_sampling(cfg: RejectionSamplingConfig, group: RoleGroup, rollouts: Rollouts, tokenizer: Tokenizer,
                       prompts: list[dict], run_id: str, state: StepState | None = None, resumed: dict | None = None,
                       keep: dict | None = None) -> list[dict]:
    """All rounds, each logged to the run; returns the kept answers as SFT records (the dialogs the
    policy was last fine-tuned on).

    With `state`, the policy, its optimizer, the best answers so far and the round are saved every
    `save_every` rounds (with `keep`, what the step wants back); `resumed` continues after that save."""
    k, n = cfg.samples_per_prompt, len(prompts)
    best: list[tuple[float, str] | None] = [None] * n  # per prompt: (reward, reply), best of all rounds
    first = 0
    if resumed is not None:
        first, best = resumed["next"], resumed["best"]
    for rnd in range(first, cfg.rounds):
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
        if state is not None and ((rnd + 1) % cfg.save_every == 0 or rnd + 1 == cfg.rounds):
            state.save({"next": rnd + 1, "best": best, "keep": keep})
    return [{"messages": prompt_messages(p["prompt"]) + [{"role": "assistant", "content": reply}]}
            for p, (_, reply) in zip(prompts, best)]


def finetune(cfg: RejectionSamplingConfig, group: RoleGroup, tokenizer: Tokenizer, kept: list[dict]) -> float:
    """`epochs` passes of the SFT loss over the kept answers, packed; the mean loss of the last pass.
    The policy's ranks share each micro-batch, weighted by answer tokens (`shard_rows`)."""
    columns = packed_rows([encode_dialog(tokenizer, r["messages"]) for r in kept], cfg.seq_len)
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.epochs):
        order, losses = torch.randperm(len(columns["labels"]), generator=gen), []
        for i in range(0, len(order), cfg.micro_batch_size):
            rows = order[i:i + cfg.micro_batch_size]
            batch = {k: v[rows] for k, v in columns.items()}
            shards = shard_rows(batch, group.size["policy"], (batch["labels"] != IGNORE).sum(1))
            losses.append(group.get({"policy": group.remote("policy", "train_sft", shards=shards)},
                                    "fine-tuning")["policy"])
    return sum(losses) / len(losses)
