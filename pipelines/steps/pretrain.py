"""Step: pretrain a Llama 2 model from scratch on prepared blocks (`corral.train.pretrain`).

inputs: `data` (the prepare_data output; `config.data_dir` wins); from a pipeline also `run_id`
(its nested MLflow run, which this step logs into and leaves for the pipeline to end).
outputs: `model` (corral checkpoint directory), `checkpoints` (Ray Train storage), `mlflow_run_id`.
Running it again with the same `output_dir` continues the run from its latest checkpoint and
logs into the same MLflow run.
"""

from __future__ import annotations

from pathlib import Path

from corral.config import PretrainConfig
from corral.train.pretrain import pretrain_job
from pipelines.steps.common import output_dir, run_tracked, train_outputs


def run(config: PretrainConfig | dict, inputs: dict) -> dict:
    cfg = PretrainConfig.model_validate(config)
    data_dir = cfg.data_dir or inputs.get("data")
    if data_dir is None:
        raise ValueError("pretrain needs prepared data: set `data_dir` in its config or wire the prepare_data step")
    out = output_dir(cfg.output_dir, inputs, "pretrain")
    job, datasets = pretrain_job(cfg, data_dir, out)
    result = run_tracked(job, datasets, cfg, inputs, out, artifacts={"tokenizer": Path(data_dir) / "tokenizer.model"})
    return train_outputs(job, result)
