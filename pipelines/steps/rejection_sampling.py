"""Step: rejection sampling fine-tuning of the policy with the combined reward (Llama 2, 3.2.3).

inputs: `model` (the policy to start from, e.g. the SFT step's; `config.policy` wins), `upstream`
(reward steps named by `helpful_reward` / `safety_reward`), `run_id` from a pipeline.
outputs: `model` (the fine-tuned policy, corral format), `mlflow_run_id`, `summary` (JSON with
held-out metrics before and after), `kept` (the best answer per training prompt, SFT JSONL: the
dialogs the policy was last fine-tuned on, also the run's `kept.jsonl` artifact).
Every `save_every` rounds the policy, its optimizer, the best answers and the round are saved to
`<output_dir>/state/`: running the step again continues from there, in the same MLflow run.
"""

from __future__ import annotations

import json
import sys

from corral import tracking
from corral.checkpoint import load_tokenizer
from corral.data.formats import write_records
from corral.rlhf.actors import RoleGroup
from corral.rlhf.config import RejectionSamplingConfig
from corral.rlhf.generators import start_rollouts
from corral.rlhf.rejection import TRAINED, rejection_sampling, rs_roles
from corral.rlhf.resume import StepState
from corral.rlhf.rollout import heldout, heldout_summary, load_prompts
from pipelines.steps.common import input_models, output_dir


def run(config: RejectionSamplingConfig | dict, inputs: dict) -> dict:
    cfg = RejectionSamplingConfig.model_validate(config)
    policy, helpful, safety = input_models(cfg, inputs)
    out = output_dir(cfg.output_dir, inputs, "rejection_sampling")
    out.mkdir(parents=True, exist_ok=True)
    name = cfg.tracking.run_name or "rejection_sampling"
    with tracking.step_run(inputs, cfg.tracking.experiment, name, out) as run_id:
        tracking.log_params(run_id, cfg.model_dump(mode="json") | {"policy_path": policy, "helpful_path": helpful,
                                                                      "safety_path": safety})
        tokenizer = load_tokenizer(policy)
        train, held = load_prompts(cfg.prompts)
        group = RoleGroup(rs_roles(cfg, policy, helpful, safety), cfg.resources, "rejection sampling")
        rollouts = None
        try:
            rollouts = start_rollouts(group, cfg.rollout, policy, cfg.resources, cfg.seed)
            state = StepState(out, group, TRAINED)
            resumed = state.load()  # a re-run continues after the last saved round, in the same MLflow run
            if resumed:  # the engines start from the policy checkpoint: give them the restored weights
                rollouts.sync()
            before = (resumed["keep"]["before"] if resumed else
                      heldout(group, rollouts, tokenizer, held, cfg.max_new_tokens, cfg.safety_threshold))
            kept = rejection_sampling(cfg, group, rollouts, tokenizer, train, run_id, state, resumed,
                                      keep={"before": before})
            after = heldout(group, rollouts, tokenizer, held, cfg.max_new_tokens, cfg.safety_threshold)
            group.call("policy", "save", str(out / "policy"), {"stage": "rejection_sampling", "rounds": cfg.rounds},
                       doing="saving")
        finally:
            if rollouts is not None:
                rollouts.shutdown()
            group.shutdown()
        summary = heldout_summary(before, after)
        tracking.log_metrics(run_id, summary, step=cfg.rounds)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print("rejection sampling held-out: " + json.dumps(summary), file=sys.stderr)
        tracking.log_artifacts(run_id, write_records(out / "kept.jsonl", kept))
        tracking.log_artifacts(run_id, out / "policy", "model")
    return {"model": str(out / "policy"), "mlflow_run_id": run_id, "summary": str(out / "summary.json"),
            "kept": str(out / "kept.jsonl")}
