"""Step: PPO with the Llama 2 reward on Ray actors (policy, critic, reference, two reward models).

inputs: `model` (the policy to start from, e.g. rejection sampling's; `config.policy` wins),
`upstream` (reward steps named by `helpful_reward` / `safety_reward`), `run_id` from a pipeline.
outputs: `model` (the last good policy, corral format), `mlflow_run_id`, `summary` (JSON with
held-out metrics before and after, and why the run stopped early if it did).
Every `save_every` iterations the policy, critic, optimizers, iteration and RNG are saved to
`<output_dir>/state/`: running the step again continues from there, in the same MLflow run.
"""

from __future__ import annotations

import json
import sys

from corral import tracking
from corral.checkpoint import load_tokenizer, read_config
from corral.rlhf.actors import RoleGroup
from corral.rlhf.config import PPOConfig
from corral.rlhf.generators import start_rollouts
from corral.rlhf.ppo import TRAINED, ppo_roles, ptx_rows, train_ppo
from corral.rlhf.resume import StepState
from corral.rlhf.rollout import heldout, heldout_summary, load_prompts
from pipelines.steps.common import input_models, output_dir


def run(config: PPOConfig | dict, inputs: dict) -> dict:
    cfg = PPOConfig.model_validate(config)
    policy, helpful, safety = input_models(cfg, inputs)
    beta = cfg.beta_for(read_config(policy))
    out = output_dir(cfg.output_dir, inputs, "ppo")
    out.mkdir(parents=True, exist_ok=True)
    with tracking.step_run(inputs, cfg.tracking.experiment, cfg.tracking.run_name or "ppo", out) as run_id:
        tracking.log_params(run_id, cfg.model_dump(mode="json") | {"policy_path": policy, "helpful_path": helpful,
                                                                      "safety_path": safety, "beta_used": beta})
        tokenizer = load_tokenizer(policy)
        train, held = load_prompts(cfg.prompts)
        ptx = ptx_rows(cfg, tokenizer)
        group = RoleGroup(ppo_roles(cfg, policy, helpful, safety), cfg.resources, "PPO")
        rollouts = None
        try:
            rollouts = start_rollouts(group, cfg.rollout, policy, cfg.resources, cfg.seed)
            state = StepState(out, group, TRAINED)
            resumed = state.load()  # a re-run continues after the last save, in the same MLflow run
            if resumed:  # the engines start from the policy checkpoint: give them the restored weights
                rollouts.sync()
            before = (resumed["keep"]["before"] if resumed else
                      heldout(group, rollouts, tokenizer, held, cfg.max_new_tokens, cfg.safety_threshold))
            result = train_ppo(cfg, group, rollouts, tokenizer, train, beta, run_id, out / "policy", ptx, state,
                               resumed, keep={"before": before})
            # after an early stop the live policy is the rejected one: judge only a finished run
            after = None if result["stop_reason"] else heldout(group, rollouts, tokenizer, held, cfg.max_new_tokens,
                                                               cfg.safety_threshold)
        finally:
            if rollouts is not None:
                rollouts.shutdown()
            group.shutdown()
        summary = heldout_summary(before, after) | {"iterations": result["iterations"],
                                                    "last_good": result["last_good"]}
        if result["stop_reason"]:
            summary["stop_reason"] = result["stop_reason"]
            tracking.client().set_tag(run_id, "corral.ppo.stopped_early", result["stop_reason"])
            print(f"PPO stopped early: {result['stop_reason']} ({out / 'policy'})", file=sys.stderr)
        tracking.log_metrics(run_id, {k: v for k, v in summary.items() if isinstance(v, (int, float))},
                             step=result["iterations"])
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print("PPO held-out: " + json.dumps(summary), file=sys.stderr)
        tracking.log_artifacts(run_id, out / "policy", "model")
    return {"model": str(out / "policy"), "mlflow_run_id": run_id, "summary": str(out / "summary.json")}
