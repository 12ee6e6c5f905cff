"""What rejection sampling and PPO share: prompts, sampling through the policy role, scoring with
the combined reward, held-out evaluation and the paired bootstrap that judges it.

Prompts come from files (rl_prompts records, or SFT dialogs' prompts) or from the synthetic task
suite. A record may say what a right reply is (`answer`, `refuse`); held-out exact match and
refusal rates are reported for the records that do, whatever their source."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from corral.data.formats import prompt_messages, read_all
from corral.data.tasks import TaskSuite
from corral.engine import SamplingParams
from corral.evaluate import is_refusal, normalise
from corral.rlhf.actors import RoleGroup
from corral.rlhf.config import PromptsConfig
from corral.rlhf.generators import Rollouts
from corral.rlhf.objectives import combined_reward, gate_rate
from corral.tokenizer import Tokenizer


def read_prompts(paths: list[str], fmt: str) -> list[dict]:
    """Prompt records from rl_prompts files, or from SFT files (each dialog without its last
    answer: the prompt it was written for)."""
    if fmt == "sft":
        return [{"prompt": r["messages"][:-1]} for r in read_all(paths, "sft")]
    return read_all(paths, "rl_prompts")


def load_prompts(cfg: PromptsConfig) -> tuple[list[dict], list[dict]]:
    """(train, held-out) prompt records: the configured files, else the synthetic task suite."""
    suite = TaskSuite(cfg.suite_seed)
    train = (read_prompts(cfg.data, cfg.format) if cfg.data
             else suite.rl_prompts(cfg.n_train, "train", cfg.safety_fraction))
    held_out = (read_prompts(cfg.eval_data, cfg.format) if cfg.eval_data
                else [] if cfg.data else suite.rl_prompts(cfg.n_eval, "eval", cfg.safety_fraction))
    return train, held_out


def correct(record: dict, reply: str) -> bool | None:
    """Whether a reply is right, for records that say (`answer`: the exact reply, or `refuse`:
    whether it should decline); else None. Any prompt set may carry them, not only the suite's."""
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


def sample_and_score(group: RoleGroup, rollouts: Rollouts, tokenizer: Tokenizer, records: list[dict],
                     params: SamplingParams, safety_threshold: float) -> Samples:
    """One rollout phase: the policy samples every prompt (in its role or on the vLLM engines, see
    `corral.rlhf.generators`), both reward models score the replies, in batches."""
    dialogs = [prompt_messages(r["prompt"]) for r in records]
    prompt_ids = [tokenizer.encode_chat(d) for d in dialogs]
    response_ids = rollouts.generate(prompt_ids, params)
    replies = [tokenizer.decode([t for t in ids if t != tokenizer.eos_id]) for ids in response_ids]
    finished = [d + [{"role": "assistant", "content": reply}] for d, reply in zip(dialogs, replies)]
    scores = group.get({"helpful": group.remote("helpful", "score", finished),
                        "safety": group.remote("safety", "score", finished)}, "scoring")
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


def heldout(group: RoleGroup, rollouts: Rollouts, tokenizer: Tokenizer, records: list[dict], max_tokens: int,
            safety_threshold: float) -> dict:
    """Greedy replies to held-out prompts: per-prompt combined rewards and the metrics they give."""
    if not records:
        return {"rewards": [], "metrics": {}}
    s = sample_and_score(group, rollouts, tokenizer, records, SamplingParams(temperature=0.0, max_tokens=max_tokens),
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


def heldout_summary(before: dict, after: dict | None) -> dict:
    """Held-out metrics before and after, and the paired bootstrap interval of the reward change."""
    out = {f"{k}_start": v for k, v in before["metrics"].items()}
    if after is not None:
        out |= {f"{k}_end": v for k, v in after["metrics"].items()}
        if before["rewards"]:
            mean, low, high = paired_bootstrap(before["rewards"], after["rewards"])
            out |= {"heldout_reward_delta": mean, "heldout_reward_delta_ci_low": low,
                    "heldout_reward_delta_ci_high": high}
    return out


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
