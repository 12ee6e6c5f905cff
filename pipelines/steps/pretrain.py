"""Step: pretrain a Llama 2 model from scratch on prepared blocks (Ray Train + DeepSpeed, MLflow).

inputs: `data` (the prepare_data output; `config.data_dir` wins); from a pipeline also `run_id`
(its nested MLflow run, which this step logs into and leaves for the pipeline to end).
outputs: `model` (corral checkpoint directory), `checkpoints` (Ray Train storage), `mlflow_run_id`.
Running it again with the same `output_dir` continues the run from its latest checkpoint and
logs into the same MLflow run.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from corral import tracking
from corral.config import PretrainConfig
from corral.train import fit
from corral.train.pretrain import pretrain_job


def run(config: PretrainConfig | dict, inputs: dict) -> dict:
    cfg = PretrainConfig.model_validate(config)
    data_dir = cfg.data_dir or inputs.get("data")
    if data_dir is None:
        raise ValueError("pretrain needs prepared data: set `data_dir` in its config or wire the prepare_data step")
    job, datasets = pretrain_job(cfg, data_dir)  # checks the data before any worker starts
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", job.tracking_uri)  # no server: the run's own SQLite
    with tracking.step_run(inputs, cfg.tracking.experiment, cfg.tracking.run_name or "pretrain", out) as run_id:
        job.mlflow_run_id = run_id
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        tracking.log_params(run_id, cfg.model_dump(mode="json") | {"data_dir": str(data_dir)})
        tracking.log_artifacts(run_id, out / "config.yaml")
        tracking.log_artifacts(run_id, Path(data_dir) / "tokenizer.model", "tokenizer")
        result = fit(job, datasets)
        tracking.log_artifacts(run_id, job.export_dir, "model")
    return {"model": job.export_dir, "checkpoints": str(Path(result.path)), "mlflow_run_id": run_id}
