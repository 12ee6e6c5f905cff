"""Step: a Llama Guard-style safety classifier, fine-tuned by the SFT job (`corral.train.guard`).

inputs: `model` (the checkpoint to start from, e.g. the pretrained base; `config.base_model` wins),
and from a pipeline `output_dir` and `run_id`. outputs: `model` and `guard_model` (the guard
checkpoint: `corral.guard.Guard` and Serve's `args.guard` load it), `guard_metrics` (JSON:
held-out precision, recall and F1 of `unsafe` and of each category), `checkpoints`, `mlflow_run_id`.
"""

from __future__ import annotations

import json

from corral import tracking
from corral.config import GuardConfig
from corral.guard import Guard, guard_metrics
from corral.train.guard import guard_job
from pipelines.steps.common import input_model, output_dir, run_tracked, train_outputs


def run(config: GuardConfig | dict, inputs: dict) -> dict:
    cfg = GuardConfig.model_validate(config)
    out = output_dir(cfg.output_dir, inputs, "guard")
    job, datasets, held = guard_job(cfg, input_model(cfg.base_model, inputs, "guard"), out)
    result = run_tracked(job, datasets, cfg, inputs, out)

    guard = Guard(job.export_dir)
    metrics = guard_metrics(held, guard.assess([r["messages"] for r in held]), guard.categories)
    tracking.log_metrics(job.mlflow_run_id, {f"heldout_{k}": v for k, v in metrics.items()}, job.loop.max_steps)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    tracking.log_artifacts(job.mlflow_run_id, out / "metrics.json")
    print("guard held-out: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return train_outputs(job, result) | {"guard_model": job.export_dir, "guard_metrics": str(out / "metrics.json")}
