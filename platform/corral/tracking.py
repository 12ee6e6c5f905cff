"""MLflow tracking: runs (and nested runs), flattened params, per-step metrics, artifacts.

Everything goes through `MlflowClient` with explicit run ids, never MLflow's global "active run":
a training worker, a Ray task and the driver can all log into the same run, and a resumed
training run logs into the run it started in. The server comes from MLFLOW_TRACKING_URI.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI nests runs by
MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit


def tracking_uri(default_dir: str | os.PathLike | None = None) -> str:
    """MLFLOW_TRACKING_URI, else SQLite in `default_dir` (absolute, so Ray workers on this host agree)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    directory = Path(default_dir or ".").resolve()
    directory.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{directory / 'mlflow.db'}"


def client() -> MlflowClient:
    return MlflowClient()  # MLFLOW_TRACKING_URI, or ./mlruns when unset


def artifact_location() -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite database (MLflow's default is
    ./mlruns in whatever directory the process runs in); a server's own default otherwise."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()


def start_run(experiment: str, run_name: str | None = None, parent_run_id: str | None = None,
              tags: Mapping[str, str] | None = None) -> str:
    """Create a run in `experiment` (created if missing), nested under `parent_run_id`; its id."""
    c = client()
    exp = c.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else c.create_experiment(experiment, artifact_location())
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    return c.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id


def resume_run(run_id: str) -> str:
    """Mark an earlier run as running again (a resumed training run keeps logging into it)."""
    client().update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    return run_id


def end_run(run_id: str, status: str = "FINISHED") -> None:
    """status: FINISHED, FAILED or KILLED."""
    client().set_terminated(run_id, status=status)


RUN_RECORD = "mlflow_run.json"  # in a step's output directory: the run an interrupted attempt logged into


def recorded_run(out: str | os.PathLike, experiment: str, name: str, parent_run_id: str | None = None,
                 tags: Mapping[str, str] | None = None) -> str:
    """The run recorded in `out/mlflow_run.json`, resumed (with `tags` set again); else a new one.

    A step that continues from its checkpoint thereby keeps one metric history across attempts.
    """
    record = Path(out) / RUN_RECORD
    tags = dict(tags or {})
    if record.is_file():
        run_id = resume_run(json.loads(record.read_text())["run_id"])
        for k, v in (tags | ({PARENT_TAG: parent_run_id} if parent_run_id else {})).items():
            client().set_tag(run_id, k, v)
        return run_id
    run_id = start_run(experiment, name, parent_run_id, tags)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"run_id": run_id}) + "\n")
    return run_id


@contextmanager
def step_run(inputs: Mapping, experiment: str, name: str, out: str | os.PathLike) -> Iterator[str]:
    """The MLflow run a step logs into, as a context manager yielding its id.

    In a pipeline that is the nested run the runner hands over (`inputs["run_id"]`), which the
    runner ends. Run alone, the step gets a run of its own, recorded in `out/mlflow_run.json` so
    that running the step again resumes it; it ends FINISHED, or FAILED if the step raises.
    """
    if "run_id" in inputs:
        yield inputs["run_id"]
        return
    run_id = recorded_run(out, experiment, name)
    try:
        yield run_id
    except BaseException:
        end_run(run_id, "FAILED")
        raise
    end_run(run_id)


def flatten(params: Mapping, prefix: str = "") -> dict[str, str]:
    """{"optim": {"lr": 3e-4}} -> {"optim.lr": "0.0003"}; lists and None become their text."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def log_params(run_id: str, params: Mapping) -> None:
    """Log a (nested) config as flattened params; keys already logged with the same value are skipped.

    MLflow params are immutable: a changed value raises, naming the keys, because a run that
    resumes with a different config is a different run.
    """
    c = client()
    logged = c.get_run(run_id).data.params
    flat = flatten(params)
    changed = {k: (logged[k], v) for k, v in flat.items() if k in logged and logged[k] != v}
    if changed:
        detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
        raise ValueError(f"MLflow run {run_id} was logged with a different config ({detail}); "
                         f"use a new output directory for a new run")
    new = [Param(k, v) for k, v in flat.items() if k not in logged]
    for i in range(0, len(new), MAX_PARAMS_PER_BATCH):
        c.log_batch(run_id, params=new[i:i + MAX_PARAMS_PER_BATCH])


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """One batch of metrics at `step` (a single HTTP request)."""
    now = int(time.time() * 1000)
    client().log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def log_artifacts(run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
    """Upload a file or a directory's contents under `artifact_path`."""
    p = Path(path)
    if p.is_dir():
        client().log_artifacts(run_id, str(p), artifact_path)
    else:
        client().log_artifact(run_id, str(p), artifact_path)


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of a metric in logging order, duplicates included."""
    history = client().get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(history, key=lambda m: (m.timestamp, m.step))]
