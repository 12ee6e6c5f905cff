"""PPO (Llama 2, section 3.2.3) driven from one process over the role actors of a `RoleGroup`.

Each iteration: the policy samples a batch of prompts through the shared engine; both reward
models score the replies; R = WHITEN(LOGIT(R_c)) on the last token minus beta * KL(pi || pi_ref)
on every token; GAE (gamma 1, lambda 0.95) with the critic's values; then minibatches, one
gradient step each, on the policy (clipped surrogate) and the critic (clipped value loss) at once.
With `ptx.coef` > 0 each policy step also takes that much of the SFT loss on demonstration rows
(InstructGPT's PPO-ptx), which holds on to what SFT taught while the reward is optimised.

The run stops early, keeping the last good checkpoint, when the mean KL per response passes
`max_kl` or a loss becomes NaN.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from corral import tracking
from corral.data.formats import read_all
from corral.data.sft import encode_record, packed_rows
from corral.data.tasks import TaskSuite
from corral.engine import SamplingParams
from corral.rlhf.actors import CriticActor, PolicyActor, ReferenceActor, RewardActor, Role, RoleGroup, shard_rows
from corral.rlhf.config import PPOConfig, PtxConfig
from corral.rlhf.generators import Rollouts
from corral.rlhf.objectives import gae, logit, ppo_token_rewards, whiten
from corral.rlhf.resume import StepState
from corral.rlhf.rollout import Samples, pad_rollouts, sample_and_score
from corral.train.losses import IGNORE, token_kl
from corral.tokenizer import Tokenizer


TRAINED = ("policy", "critic")


def ppo_roles(cfg: PPOConfig, policy: str, helpful: str, safety: str) -> dict[str, Role]:
    """The five roles: two trained under DeepSpeed (groups of `resources.ranks`), three frozen (one
    actor each, or ZeRO-3 inference groups where `resources.ranks` names them)."""
    r, bf16 = cfg.resources, cfg.deepspeed.bf16
    return {
        "policy": Role(PolicyActor, (policy, cfg.deepspeed, cfg.optim, cfg.minibatch_size), r.ranks_of("policy")),
        "critic": Role(CriticActor, (helpful, cfg.deepspeed, cfg.critic_optim, cfg.minibatch_size),
                       r.ranks_of("critic")),
        "reference": Role(ReferenceActor, (policy, bf16), r.group_of("reference")),
        "helpful": Role(RewardActor, (helpful, bf16), r.group_of("helpful")),
        "safety": Role(RewardActor, (safety, bf16), r.group_of("safety")),
    }


@dataclass
class Experience:
    samples: Samples
    batch: dict[str, torch.Tensor]  # tokens (bsz, L); mask, logprobs, values, advantages, returns (bsz, L-1)
    metrics: dict[str, float]


def make_experience(group: RoleGroup, rollouts: Rollouts, tokenizer: Tokenizer, records: list[dict], cfg: PPOConfig,
                    beta: float, seed: int) -> Experience:
    """Sample, score, and turn the scores into per-token advantages and returns."""
    params = SamplingParams(temperature=cfg.temperature, max_tokens=cfg.max_new_tokens, seed=seed)
    t0 = time.perf_counter()
    s = sample_and_score(group, rollouts, tokenizer, records, params, cfg.safety_threshold)
    t1 = time.perf_counter()
    tokens, mask = pad_rollouts(s.prompt_ids, s.response_ids)
    out = group.get({"policy": group.remote("policy", "logprobs", tokens),
                     "reference": group.remote("reference", "logprobs", tokens),
                     "critic": group.remote("critic", "values", tokens)}, "scoring the rollouts")
    kl = token_kl(out["policy"], out["reference"], mask)
    score = whiten(logit(s.reward))  # (bsz,)
    rewards = ppo_token_rewards(score, kl, mask, beta)
    advantages, returns = gae(rewards, out["critic"] * mask, mask, cfg.gamma, cfg.lam)
    batch = {"tokens": tokens, "mask": mask, "logprobs": out["policy"], "values": out["critic"] * mask,
             "advantages": whiten(advantages, mask), "returns": returns}
    metrics = {"reward": s.reward.mean().item(), "reward_helpful": s.helpful.mean().item(),
               "reward_safety": s.safety.mean().item(), "safety_gate_rate": s.gate_rate(cfg.safety_threshold),
               "kl": kl.sum(1).mean().item(), "response_length": mask.sum(1).mean().item(),
               "time_rollout_s": t1 - t0, "time_logprobs_s": time.perf_counter() - t1}
    return Experience(s, batch, metrics)


class PtxRows:
    """PPO-ptx's demonstrations: packed SFT rows, handed out `rows_per_step` at a time, reshuffled
    after each pass."""

    def __init__(self, cfg: PtxConfig, tokenizer: Tokenizer, seed: int):
        if cfg.data:
            records = read_all(cfg.data, "sft")
        else:
            records = TaskSuite(cfg.tasks.seed).sft_dialogs(cfg.tasks.train_size)
        self.rows = packed_rows([encode_record(tokenizer, r) for r in records], cfg.seq_len)
        self.n, self.per_step = len(self.rows["labels"]), cfg.rows_per_step
        if self.n == 0:
            raise ValueError(f"ptx: no dialog fits in seq_len {cfg.seq_len}; raise ptx.seq_len")
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.at = torch.randperm(self.n, generator=self.gen), 0

    def state(self) -> dict:
        return {"gen": self.gen.get_state(), "order": self.order, "at": self.at}

    def restore(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.order, self.at = state["order"], state["at"]

    def next(self) -> dict[str, torch.Tensor]:
        if self.at + self.per_step > self.n:
            self.order, self.at = torch.randperm(self.n, generator=self.gen), 0
        rows = self.order[self.at:self.at + self.per_step]
        self.at += self.per_step
        return {k: v[rows] for k, v in self.rows.items()}


def ppo_update(group: RoleGroup, batch: dict[str, torch.Tensor], cfg: PPOConfig, gen: torch.Generator,
               train_policy: bool = True, ptx: PtxRows | None = None) -> dict[str, float]:
    """Shuffled minibatches, one gradient step each on policy and critic; the mean of their stats.

    Each group's ranks share a minibatch (`shard_rows`: weighted by response tokens, so N ranks take
    the same step as one)."""
    stats: dict[str, list[float]] = {}
    n = batch["tokens"].shape[0]
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.minibatch_size):
            mb = {k: v[order[i:i + cfg.minibatch_size]] for k, v in batch.items()}
            tokens = mb["mask"].sum(1)
            critic = [(rows, cfg.value_clip, w) for rows, w in shard_rows(mb, group.size["critic"], tokens)]
            calls = {"critic": group.remote("critic", "train_values", shards=critic)}
            if train_policy:
                shards = shard_rows(mb, group.size["policy"], tokens)
                if ptx is None:
                    shards = [(rows, cfg.clip, None, 0.0, w, 1.0) for rows, w in shards]
                else:
                    rows = ptx.next()
                    ptx_shards = shard_rows(rows, group.size["policy"], (rows["labels"] != IGNORE).sum(1))
                    shards = [(r, cfg.clip, p, cfg.ptx.coef, w, pw) for (r, w), (p, pw) in zip(shards, ptx_shards)]
                calls["policy"] = group.remote("policy", "train_ppo", shards=shards)
            out = group.get(calls, "training")
            for k, v in (out.get("policy", {}) | out["critic"]).items():
                stats.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in stats.items()}


def sample_table(run_id: str, samples: Samples, rows: int, iteration: int) -> None:
    """Prompts, replies and rewards of the first `rows` samples, as an MLflow table."""
    data = {"prompt": [str(r["prompt"]) for r in samples.records[:rows]], "response": samples.replies[:rows],
            "reward": samples.reward[:rows].tolist(), "helpful": samples.helpful[:rows].tolist(),
            "safety": samples.safety[:rows].tolist()}
    tracking.client().log_table(run_id, data=data, artifact_file=f"samples/iteration_{iteration:05d}.json")


def ptx_rows(cfg: PPOConfig, tokenizer: Tokenizer) -> PtxRows | None:
    """PPO-ptx's rows when `ptx.coef` is set; build them before the roles start, so bad data fails first."""
    return PtxRows(cfg.ptx, tokenizer, cfg.seed) if cfg.ptx.coef > 0 else None


def train_ppo(cfg: PPOConfig, group: RoleGroup, rollouts: Rollouts, tokenizer: Tokenizer, prompts: list[dict],
              beta: float, run_id: str, policy_dir: Path, ptx: PtxRows | None = None, state: StepState | None = None,
              resumed: dict | None = None, keep: dict | None = None) -> dict:
    """The PPO loop. Returns {"iterations", "last_good", "stop_reason", "history"}.

    With `state`, the policy, critic, optimizers, generators and iteration are saved every
    `save_every` iterations (with `keep`, what the step wants back on resume); `resumed` (what
    `state.load()` returned) continues the loop at the iteration after that save."""
    gen = torch.Generator().manual_seed(cfg.seed)
    history, last_good, stop_reason, first = [], None, None, 0
    if resumed is not None:
        first, last_good, history = resumed["next"], resumed["last_good"], resumed["history"]
        gen.set_state(resumed["gen"])
        if ptx is not None:
            ptx.restore(resumed["ptx"])
    for it in range(first, cfg.iterations):
        start = it * cfg.rollout_batch_size
        records = [prompts[(start + j) % len(prompts)] for j in range(cfg.rollout_batch_size)]
        exp = make_experience(group, rollouts, tokenizer, records, cfg, beta, seed=cfg.seed * 1_000_003 + it)
        if exp.metrics["kl"] > cfg.max_kl:  # this policy is already too far from the reference
            stop_reason = (f"iteration {it}: KL {exp.metrics['kl']:.3f} passed max_kl {cfg.max_kl}; "
                           f"kept the policy of iteration {last_good}")
            break
        if it % cfg.save_every == 0:
            group.call("policy", "save", str(policy_dir), {"stage": "ppo", "iteration": it}, doing="saving")
            last_good = it
        if it % cfg.samples_every == 0:
            sample_table(run_id, exp.samples, cfg.sample_rows, it)
        t0 = time.perf_counter()
        metrics = exp.metrics | ppo_update(group, exp.batch, cfg, gen, train_policy=it >= cfg.critic_warmup,
                                           ptx=ptx)
        metrics["time_update_s"] = time.perf_counter() - t0
        if it >= cfg.critic_warmup:  # the policy moved: the next rollouts must sample from it
            t0 = time.perf_counter()
            rollouts.sync()
            metrics["time_sync_s"] = time.perf_counter() - t0
        tracking.log_metrics(run_id, metrics, step=it)
        history.append(metrics)
        print(f"ppo {it}: " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
        if not all(math.isfinite(v) for v in metrics.values()):
            bad = [k for k, v in metrics.items() if not math.isfinite(v)]
            stop_reason = f"iteration {it}: {', '.join(bad)} became NaN; kept the policy of iteration {last_good}"
            break
        if state is not None and ((it + 1) % cfg.save_every == 0 or it + 1 == cfg.iterations):
            state.save({"next": it + 1, "last_good": last_good, "history": history, "gen": gen.get_state(),
                        "ptx": None if ptx is None else ptx.state(), "keep": keep})
    else:
        group.call("policy", "save", str(policy_dir), {"stage": "ppo", "iteration": cfg.iterations},
                   doing="saving")
        last_good = cfg.iterations
    return {"iterations": len(history), "last_good": last_good, "stop_reason": stop_reason, "history": history}
