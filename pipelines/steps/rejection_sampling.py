"""Step: rejection sampling fine-tuning of the policy with the combined reward (Llama 2, 3.2.3).

inputs: `model` (the policy to start from, e.g. the SFT step's; `config.policy` wins), `upstream`
(reward steps named by `helpful_reward` / `safety_reward`), `run_id` from a pipeline.
outputs: `model` (the fine-tuned policy, corral format), `mlflow_run_id`, `summary` (JSON with
held-out metrics before and after), `kept` (the best answer per training prompt, SFT JSONL: the
dialogs the policy was last fine-tuned on, also the run's `kept.jsonl` artifact).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from corral import tracking
from corral.checkpoint import load_tokenizer
from corral.data.formats import write_records
from corral.rlhf.actors import RoleGroup
from corral.rlhf.config import RejectionSamplingConfig, RLStepConfig
from corral.rlhf.rejection import rejection_sampling, rs_roles
from corral.rlhf.rollout import heldout, load_prompts, paired_bootstrap


def resolve_models(cfg: RLStepConfig, inputs: dict) -> tuple[str, str, str]:
    """(policy, helpful reward, safety reward) checkpoint directories.

    Each is the configured path, or the output of the configured upstream step id, or by default
    the merged input the SFT step (`model`) and the reward step (`{kind}_reward_model`) give.
    """
    upstream = inputs.get("upstream", {})

    def resolve(field: str, value: str | None, key: str) -> str:
        if value is None:
            if key not in inputs:
                raise ValueError(f"{field} is not set and no upstream step gives `{key}`; set `{field}` to a "
                                 f"checkpoint directory or an upstream step id")
            return str(inputs[key])
        if value in upstream:
            outputs = upstream[value]
            if key not in outputs and "model" not in outputs:
                raise ValueError(f"{field}: upstream step {value!r} gives no `{key}` (it gives {', '.join(outputs)})")
            return str(outputs.get(key, outputs.get("model")))
        if not Path(value).is_dir():
            raise ValueError(f"{field} {value!r} is neither an upstream step ({', '.join(upstream) or 'none'}) "
                             f"nor a checkpoint directory")
        return value

    return (resolve("policy", cfg.policy, "model"),
            resolve("helpful_reward", cfg.helpful_reward, "helpfulness_reward_model"),
            resolve("safety_reward", cfg.safety_reward, "safety_reward_model"))


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


def run(config: RejectionSamplingConfig | dict, inputs: dict) -> dict:
    cfg = RejectionSamplingConfig.model_validate(config)
    policy, helpful, safety = resolve_models(cfg, inputs)
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    name = cfg.tracking.run_name or "rejection_sampling"
    with tracking.step_run(inputs, cfg.tracking.experiment, name, out) as run_id:
        tracking.log_params(run_id, cfg.model_dump(mode="json") | {"policy_path": policy, "helpful_path": helpful,
                                                                      "safety_path": safety})
        tokenizer = load_tokenizer(policy)
        train, held = load_prompts(cfg.prompts)
        group = RoleGroup(rs_roles(cfg, policy, helpful, safety), cfg.resources, "rejection sampling")
        try:
            before = heldout(group, tokenizer, held, cfg.max_new_tokens, cfg.safety_threshold)
            kept = rejection_sampling(cfg, group, tokenizer, train, run_id)
            after = heldout(group, tokenizer, held, cfg.max_new_tokens, cfg.safety_threshold)
            group.call("policy", "save", str(out / "policy"), {"stage": "rejection_sampling", "rounds": cfg.rounds},
                       doing="saving")
        finally:
            group.shutdown()
        summary = heldout_summary(before, after)
        tracking.log_metrics(run_id, summary, step=cfg.rounds)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print("rejection sampling held-out: " + json.dumps(summary), file=sys.stderr)
        tracking.log_artifacts(run_id, write_records(out / "kept.jsonl", kept))
        tracking.log_artifacts(run_id, out / "policy", "model")
    return {"model": str(out / "policy"), "mlflow_run_id": run_id, "summary": str(out / "summary.json"),
            "kept": str(out / "kept.jsonl")}
