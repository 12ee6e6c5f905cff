"""Step: register the base and chat models in the MLflow Model Registry.

Each model's checkpoint directory is logged once as artifacts of this step's run (corral's layout is
Hugging Face's, so `transformers` and vLLM load a version as it is) and registered as a new
version, tagged with the evaluation metrics. The new version gets the alias `candidate`; `champion` moves to it only when every
gate passes. Serving loads `models:/NAME@champion` (or `@candidate`).
"""

from __future__ import annotations

import json
from pathlib import Path

from corral import tracking
from corral.config import RegisterConfig


def read_metrics(inputs: dict, step_id: str | None) -> dict[str, float]:
    """The numeric metrics of the evaluate step's `eval_table` ({"model": ..., "metrics": {...}})."""
    if step_id is None:
        return {}
    outputs = inputs["upstream"].get(step_id)
    if outputs is None or "eval_table" not in outputs:
        raise ValueError(f"register.metrics_from: step {step_id!r} is not upstream or has no `eval_table` output")
    metrics = json.loads(Path(outputs["eval_table"]).read_text())["metrics"]
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def run(config: RegisterConfig | dict, inputs: dict) -> dict:
    cfg = RegisterConfig.model_validate(config)
    metrics = read_metrics(inputs, cfg.metrics_from)
    failed_gates = [m for m, g in cfg.gates.items() if not g.passes(metrics.get(m))]
    client, run_id = tracking.client(), inputs["run_id"]
    artifact_uri = client.get_run(run_id).info.artifact_uri
    outputs = {}
    for entry in cfg.models:
        upstream = inputs["upstream"].get(entry.from_step)
        if upstream is None or "model" not in upstream:
            raise ValueError(f"register.models[{entry.name}]: step {entry.from_step!r} is not upstream "
                             f"or produced no `model`")
        tracking.log_artifacts(run_id, upstream["model"], f"models/{entry.name}")
        if not client.search_registered_models(f"name = '{entry.name}'"):
            client.create_registered_model(entry.name, description="corral checkpoint (Hugging Face layout)")
        version = client.create_model_version(entry.name, f"{artifact_uri}/models/{entry.name}", run_id,
                                              tags={k: str(v) for k, v in metrics.items()})
        client.set_registered_model_alias(entry.name, "candidate", version.version)
        promoted = not failed_gates
        if promoted:
            client.set_registered_model_alias(entry.name, "champion", version.version)
        print(f"registered {entry.name} v{version.version} @candidate"
              + (" @champion" if promoted else f" (champion unchanged: gates failed: {', '.join(failed_gates)})"))
        outputs[entry.name] = f"models:/{entry.name}/{version.version}"
    return outputs
