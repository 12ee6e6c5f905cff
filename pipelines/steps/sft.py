"""Step: supervised fine-tuning of any checkpoint on dialogs (`corral.train.sft`).

inputs: `model` (a checkpoint `corral.load_model` reads; `config.base_model` wins), and from a
pipeline `output_dir` and `run_id`. outputs: `model` (the fine-tuned corral checkpoint),
`checkpoints` (Ray Train storage), `mlflow_run_id`.
"""

from __future__ import annotations

from corral.config import SFTConfig
from corral.train.sft import sft_job
from pipelines.steps.common import input_model, output_dir, run_tracked, train_outputs


def run(config: SFTConfig | dict, inputs: dict) -> dict:
    cfg = SFTConfig.model_validate(config)
    out = output_dir(cfg.output_dir, inputs, "sft")
    job, datasets = sft_job(cfg, input_model(cfg.base_model, inputs, "sft"), out)
    return train_outputs(job, run_tracked(job, datasets, cfg, inputs, out))
