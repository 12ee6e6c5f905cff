"""Step: a reward model, helpfulness or safety, from the SFT checkpoint (`corral.train.reward`).

inputs: `model` (the SFT checkpoint; `config.base_model` wins), and from a pipeline `output_dir`
and `run_id`. outputs: `{kind}_reward_model` (a checkpoint `corral.load_reward_model` reads),
`{kind}_reward_metrics` (JSON: held-out pairwise accuracy overall and per rating, and the mean
reward gap), `mlflow_run_id`. Run it twice, once per kind: they are independent steps.
"""

from __future__ import annotations

import json

from corral import load_reward_model, tracking
from corral.config import RewardConfig
from corral.train.reward import evaluate_pairs, reward_job
from pipelines.steps.common import input_model, output_dir, run_tracked


def run(config: RewardConfig | dict, inputs: dict) -> dict:
    cfg = RewardConfig.model_validate(config)
    out = output_dir(cfg.output_dir, inputs, f"reward-{cfg.kind}")
    job, datasets, held = reward_job(cfg, input_model(cfg.base_model, inputs, f"reward ({cfg.kind})"), out)
    run_tracked(job, datasets, cfg, inputs, out)

    metrics = evaluate_pairs(load_reward_model(job.export_dir), held)
    tracking.log_metrics(job.mlflow_run_id, {f"heldout_{k}": v for k, v in metrics.items()}, job.loop.max_steps)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    tracking.log_artifacts(job.mlflow_run_id, out / "metrics.json")
    print(f"reward ({cfg.kind}) held-out: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return {f"{cfg.kind}_reward_model": job.export_dir, f"{cfg.kind}_reward_metrics": str(out / "metrics.json"),
            "mlflow_run_id": job.mlflow_run_id}
