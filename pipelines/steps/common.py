"""What every step shares: resolving its inputs, its output directory, and its tracked run.

One rule for where a step writes: its config's `output_dir` if set, else the directory the
pipeline gives it (stable across re-runs, so an interrupted step resumes there), else, for a step
run on its own, `$CORRAL_HOME/runs/<step>`.
"""

from __future__ import annotations

import os
from pathlib import Path

from corral import tracking
from corral.stack import corral_home
from corral.train.loop import TrainJob, fit


def output_dir(configured: str | None, inputs: dict, step: str) -> Path:
    """Where the step writes (see the module doc), as an absolute path."""
    return Path(configured or inputs.get("output_dir") or corral_home() / "runs" / step).resolve()


def input_model(configured: str | None, inputs: dict, step: str) -> Path:
    """The checkpoint a step starts from: its config's, else the upstream `model` output."""
    path = configured or inputs.get("model")
    if path is None:
        raise ValueError(f"{step} needs a starting checkpoint: set `base_model` in its config or wire an "
                         f"upstream step that outputs `model`")
    return Path(path)


def input_models(cfg, inputs: dict) -> tuple[str, str, str]:
    """(policy, helpful reward, safety reward) checkpoint directories of an RLHF step.

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


def run_tracked(job: TrainJob, datasets: dict, cfg, inputs: dict, out: Path,
                artifacts: dict[str, Path] | None = None):
    """fit() inside the step's MLflow run (the pipeline's, or one of its own): the resolved config,
    the job's `params` and `artifacts` ({artifact dir: local path}) logged first, the exported
    model last. Returns Ray Train's result."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    job.tracking_uri = tracking.tracking_uri(out)
    if not os.environ.get("MLFLOW_TRACKING_URI"):  # no server (unset or empty): the run's own SQLite, for
        os.environ["MLFLOW_TRACKING_URI"] = job.tracking_uri  # this process and the workers alike
    with tracking.step_run(inputs, cfg.tracking.experiment, cfg.tracking.run_name or job.name, out) as run_id:
        job.mlflow_run_id = run_id
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        tracking.log_params(run_id, cfg.model_dump(mode="json") | {"max_steps_resolved": job.loop.max_steps,
                                                                  **job.params})
        tracking.log_artifacts(run_id, out / "config.yaml")
        for artifact_dir, path in (artifacts or {}).items():
            tracking.log_artifacts(run_id, path, artifact_dir)
        result = fit(job, datasets)
        tracking.log_artifacts(run_id, job.export_dir, "model")
    return result


def train_outputs(job: TrainJob, result) -> dict:
    """What a training step gives downstream: the exported model, Ray Train's storage, its MLflow run."""
    return {"model": job.export_dir, "checkpoints": str(Path(result.path)), "mlflow_run_id": job.mlflow_run_id}
