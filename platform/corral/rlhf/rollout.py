"""What rejection sampling and PPO share: prompts, sampling through the policy role, scoring with
the combined reward, held-out evaluation and the paired bootstrap that judges it."""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass

import torch

from corral.data.formats import prompt_messages, read_records
from corral.data.tasks import FAMILIES, TaskSuite, draw_safety, draw_task, is_refusal
from corral.engine import SamplingParams
from corral.evaluate import normalise
from corral.rlhf.actors import RoleGroup
from corral.rlhf.config import PromptsConfig
from corral.rlhf.objectives import combined_reward, gate_rate
from corral.tokenizer import Tokenizer


def suite_prompts(seed: int, n: int, split: str, safety_fraction: float) -> list[dict]:
    """RL prompts from the task suite, with what a right reply is: `answer` (exact match) for tasks,
    `refuse` for safety-family prompts. `safety` tags the unsafe ones, as the rl_prompts format does."""
    rng = random.Random(f"{seed}:rlhf:{split}")
    suite = TaskSuite(seed)
    out = []
    for _ in range(n):
        if rng.random() < safety_fraction:
            prompt, unsafe, _ = draw_safety(rng, split, suite.eval_fraction)
            out.append({"prompt": prompt, "safety": unsafe, "refuse": unsafe})
        else:
            task = draw_task(rng.choice(FAMILIES), rng, split, suite.eval_fraction)
            out.append({"prompt": task.prompt, "safety": False, "answer": task.answer})
    return out


def load_prompts(cfg: PromptsConfig) -> tuple[list[dict], list[dict]]:
    """(train, held-out) prompt records."""
    train = (read_records(cfg.train_path, "rl_prompts") if cfg.train_path
             else suite_prompts(cfg.suite_seed, cfg.n_train, "train", cfg.safety_fraction))
    held_out = (read_records(cfg.eval_path, "rl_prompts") if cfg.eval_path
                else suite_prompts(cfg.suite_seed, cfg.n_eval, "eval", cfg.safety_fraction))
    return train, held_out


def correct(record: dict, reply: str) -> bool | None:
    """Whether a reply is right, for records that say (`answer` or `refuse`); else None."""
    if "answer" in record:
        return normalise(reply) == normalise(record["answer"])
    if "refuse" in record:
        return is_refusal(reply) == record["refuse"]
    return None


@dataclass
class Samples:
    """Sampled replies to prompts and their scores: every list and tensor has one entry per sample."""

    records: list[dict]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    replies: list[str]
    helpful: torch.Tensor
    safety: torch.Tensor
    reward: torch.Tensor  # R_c, the combined reward (a probability)
    unsafe: torch.Tensor  # the prompt's `safety` tag

    def gate_rate(self, threshold: float) -> float:
        return gate_rate(self.safety, self.unsafe, threshold)


def sample_and_score(group: RoleGroup, tokenizer: Tokenizer, records: list[dict], params: SamplingParams,
                     safety_threshold: float) -> Samples:
    """One rollout phase: the policy samples every prompt, both reward models score the replies."""
    dialogs = [prompt_messages(r["prompt"]) for r in records]
    prompt_ids = [tokenizer.encode_chat(d) for d in dialogs]
    response_ids = group.call("policy", "generate", prompt_ids, params, doing="sampling")
    replies = [tokenizer.decode([t for t in ids if t != tokenizer.eos_id]) for ids in response_ids]
    finished = [d + [{"role": "assistant", "content": reply}] for d, reply in zip(dialogs, replies)]
    scores = group.get({"helpful": group["helpful"].score.remote(finished),
                        "safety": group["safety"].score.remote(finished)}, "scoring")
    unsafe = torch.tensor([bool(r.get("safety")) for r in records])
    reward = combined_reward(scores["helpful"], scores["safety"], unsafe, safety_threshold)
    return Samples(records, prompt_ids, response_ids, replies, scores["helpful"], scores["safety"], reward, unsafe)


def gate_warning(rate: float, threshold: float) -> str | None:
    """What to tell the user when the safety gate decides most held-out replies to prompts not tagged
    unsafe (then RLHF optimises the safety score where it should optimise helpfulness); else None."""
    if rate <= 0.5:
        return None
    return (f"warning: the safety reward model scores {rate:.0%} of the held-out replies to prompts not tagged "
            f"unsafe under safety_threshold {threshold}, so their reward is the safety score, not helpfulness. "
            f"Train it with safe answers ranked over needless refusals, or lower safety_threshold.")


def heldout(group: RoleGroup, tokenizer: Tokenizer, records: list[dict], max_tokens: int,
            safety_threshold: float) -> dict:
    """Greedy replies to held-out prompts: per-prompt combined rewards and the metrics they give."""
    if not records:
        return {"rewards": [], "metrics": {}}
    s = sample_and_score(group, tokenizer, records, SamplingParams(temperature=0.0, max_tokens=max_tokens),
                         safety_threshold)
    metrics = {"heldout_reward": s.reward.mean().item(), "heldout_safety_gate_rate": s.gate_rate(safety_threshold)}
    if warning := gate_warning(metrics["heldout_safety_gate_rate"], safety_threshold):
        print(warning, file=sys.stderr, flush=True)
    judged = [(r, correct(r, reply)) for r, reply in zip(records, s.replies)]
    tasks = [ok for r, ok in judged if "answer" in r]
    unsafe = [is_refusal(reply) for r, reply in zip(records, s.replies) if r.get("refuse") is True]
    safe = [is_refusal(reply) for r, reply in zip(records, s.replies) if r.get("refuse") is False]
    if tasks:
        metrics["heldout_exact_match"] = sum(tasks) / len(tasks)
    if unsafe:
        metrics["heldout_refusal_rate_unsafe"] = sum(unsafe) / len(unsafe)
    if safe:
        metrics["heldout_false_refusal_rate_safe"] = sum(safe) / len(safe)
    return {"rewards": s.reward.tolist(), "metrics": metrics, "replies": s.replies}


def paired_bootstrap(before: list[float], after: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of after - before over paired items and its 95 % percentile bootstrap interval."""
    diff = torch.tensor(after, dtype=torch.float64) - torch.tensor(before, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(diff), (n, len(diff)), generator=gen)
    means = diff[idx].mean(1)  # (n,)
    return diff.mean().item(), means.quantile(0.025).item(), means.quantile(0.975).item()


def pad_rollouts(prompt_ids: list[list[int]], response_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + response per row, right-padded: tokens (bsz, L) and the response mask over label
    positions (bsz, L-1), where label position t is the token at t + 1."""
    seqs = [p + r for p, r in zip(prompt_ids, response_ids)]
    length = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length - 1)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        tokens[i, : len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p) - 1: len(p) - 1 + len(r)] = 1
    return tokens, mask
