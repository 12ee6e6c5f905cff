"""The step types a pipeline spec can use.

Each step module exposes `run(config, inputs) -> outputs`. `inputs` holds the outputs of the
steps it needs, merged by key in `needs` order (e.g. `tokenizer`, `data`, `model`), plus
`upstream` ({step_id: outputs}, to tell two upstream models apart), `output_dir` (this step's
own directory, stable across re-runs so an interrupted step resumes there) and `run_id` (the
MLflow run the step logs into). `outputs` is a dict of paths or URIs.
"""

from __future__ import annotations

import importlib

# uses -> (step module, "module:ConfigClass")
STEP_TYPES: dict[str, tuple[str, str]] = {
    "tokenizer": ("pipelines.steps.tokenizer", "corral.config:TokenizerConfig"),
    "prepare_data": ("pipelines.steps.prepare_data", "corral.config:PrepareDataConfig"),
    "pretrain": ("pipelines.steps.pretrain", "corral.config:PretrainConfig"),
    "register": ("pipelines.steps.register", "corral.config:RegisterConfig"),
    "sft": ("pipelines.steps.sft", "corral.config:SFTConfig"),
    "reward": ("pipelines.steps.reward", "corral.config:RewardConfig"),
    "guard": ("pipelines.steps.guard", "corral.config:GuardConfig"),
    "evaluate": ("pipelines.steps.evaluate", "corral.config:EvaluateConfig"),
    "rejection_sampling": ("pipelines.steps.rejection_sampling", "corral.rlhf.config:RejectionSamplingConfig"),
    "ppo": ("pipelines.steps.ppo", "corral.rlhf.config:PPOConfig"),
}


def _import(path: str):
    module, _, attr = path.partition(":")
    mod = importlib.import_module(module)
    return getattr(mod, attr) if attr else mod


def step_config_class(uses: str):
    return _import(STEP_TYPES[uses][1])


def step_module(uses: str):
    return _import(STEP_TYPES[uses][0])
