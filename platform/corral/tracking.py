"""MLflow tracking: runs (and nested runs), flattened params, per-step metrics, artifacts.

Everything goes through `MlflowClient` with explicit run ids, never MLflow's global "active run":
a training worker, a Ray task and the driver can all log into the same run, and a resumed
training run logs into the run it started in. The server comes from MLFLOW_TRACKING_URI.

Metrics are best-effort while a tracking server is down (`log_metrics`): an outage of MLflow
must not stop or restart training, so they wait, bounded, and are sent when it is back.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI nests runs by
MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
DEGRADED_TAG = "corral.tracking.degraded"  # set on a run whose metrics an outage held back
# Tracking is best-effort for metrics (log_metrics): an outage of the server holds them back.
MAX_OUTAGE_S = 3600.0  # one hour of training logged late, at most; then the run fails, loudly
MAX_BUFFERED = 200_000  # metric values held meanwhile (~100 MB of Metric objects)
PROBE_EVERY_S = 5.0  # while the server is down: how often a call checks whether it is back
REMIND_EVERY_S = 300.0  # while the server is down: how often the log says so again

log = logging.getLogger(__name__)


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
    """status: FINISHED, FAILED or KILLED. Metrics an outage held back are sent first."""
    if _outbox.holds(run_id):
        flush()
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


ELASTIC = ("resources.", "loop.micro_batch_size", "loop.max_steps", "max_steps_resolved", "deepspeed.grad_accum_steps")


def log_params(run_id: str, params: Mapping) -> None:
    """Log a (nested) config as flattened params; keys already logged with the same value are skipped.

    MLflow params are immutable: a changed value raises, naming the keys, because a run that
    resumes with a different config is a different run. Only the keys of an elastic resume may
    change (`ELASTIC`: more or fewer workers, the micro-batch that keeps the global batch, a
    longer run); their new values become `resumed.<key>` tags of the run.
    """
    c = client()
    logged = c.get_run(run_id).data.params
    flat = flatten(params)
    changed = {k: (logged[k], v) for k, v in flat.items() if k in logged and logged[k] != v}
    for key in [k for k in changed if k.startswith(ELASTIC)]:
        c.set_tag(run_id, f"resumed.{key}", changed.pop(key)[1])
    if changed:
        detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
        raise ValueError(f"MLflow run {run_id} was logged with a different config ({detail}); "
                         f"use a new output directory for a new run")
    new = [Param(k, v) for k, v in flat.items() if k not in logged]
    for i in range(0, len(new), MAX_PARAMS_PER_BATCH):
        c.log_batch(run_id, params=new[i:i + MAX_PARAMS_PER_BATCH])


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """One batch of metrics at `step` (a health check and one request), best-effort while the server is down.

    When an HTTP tracking server does not answer, the batch is kept with its step and time and the
    caller goes on (training does not wait for tracking); the first call that finds the server
    back sends everything kept, oldest first, and tags the runs with `corral.tracking.degraded`.
    An outage is bounded: past MAX_OUTAGE_S (or MAX_BUFFERED values) this raises
    TrackingUnavailable, since a server that never answers is a misconfiguration to fix.
    """
    now = int(time.time() * 1000)
    _outbox.send([(run_id, Metric(k, float(v), now, step)) for k, v in metrics.items()])


def flush() -> None:
    """Send the metrics an outage held back, waiting for the server (raises past MAX_OUTAGE_S)."""
    while _outbox.send([], probe_now=True):
        time.sleep(PROBE_EVERY_S)


def server_answers(timeout: float = 5.0) -> bool:
    """Whether the tracking server answers its health check; True for a local store (no server)."""
    uri = client().tracking_uri
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout)
        return True
    except urllib.error.HTTPError as e:  # an answer; a proxy's 502/503 in front of a dead server is not
        return e.code < 500
    except OSError:
        return False


class TrackingUnavailable(RuntimeError):
    """The tracking server has not answered for longer than an outage may last."""



class _Outbox:
    """Metrics the tracking server has not taken yet, oldest first, and the outage that holds them."""

    def __init__(self):
        self.pending: list[tuple[str, Metric]] = []
        self.down_since: float | None = None  # time.time() of the first failed send
        self.last_probe = self.last_reminder = 0.0
        self.waited: set[str] = set()  # runs whose metrics the outage held back
        self.lock = threading.Lock()

    def holds(self, run_id: str) -> bool:
        return any(r == run_id for r, _ in self.pending)

    def send(self, metrics: list[tuple[str, Metric]], probe_now: bool = False) -> int:
        """Queue `metrics`, then send all pending ones if the server answers; how many remain.

        The health check first: a send to a dead server would block in MLflow's own retries
        (minutes), and training with it. While down, a call checks at most every PROBE_EVERY_S.
        """
        with self.lock:
            self.pending.extend(metrics)
            if not self.pending:
                return 0
            if self.down_since is not None and not probe_now and time.time() - self.last_probe < PROBE_EVERY_S:
                return self._still_down()
            self.last_probe = time.time()
            if not server_answers():
                return self._still_down()
            try:
                while self.pending:  # consecutive metrics of one run go in one request
                    run_id = self.pending[0][0]
                    n = next((i for i, (r, _) in enumerate(self.pending) if r != run_id), len(self.pending))
                    n = min(n, MAX_METRICS_PER_BATCH)
                    client().log_batch(run_id, metrics=[m for _, m in self.pending[:n]])
                    del self.pending[:n]
            except Exception:
                if server_answers():  # the server is there and refused the batch: a real error
                    del self.pending[:n]  # which sending again would not mend
                    raise
                return self._still_down()
            if self.down_since is not None:
                self._came_back()
            return 0

    def _still_down(self) -> int:
        if self.down_since is None:
            self.down_since = self.last_reminder = time.time()
            log.warning("tracking degraded: MLflow at %s does not answer; training goes on and its metrics are "
                        "kept (with their steps and times) until it is back, for up to %.0f s",
                        client().tracking_uri, MAX_OUTAGE_S)
        self.waited.update(r for r, _ in self.pending)
        down = time.time() - self.down_since
        if down > MAX_OUTAGE_S or len(self.pending) > MAX_BUFFERED:
            raise TrackingUnavailable(
                f"MLflow at {client().tracking_uri} has not answered for {down:.0f} s and {len(self.pending)} "
                f"metric values wait to be sent; check MLFLOW_TRACKING_URI and that the server answers at "
                f"{client().tracking_uri}/health (an outage may last {MAX_OUTAGE_S:.0f} s)")
        if time.time() - self.last_reminder > REMIND_EVERY_S:
            self.last_reminder = time.time()
            log.warning("tracking degraded: MLflow at %s has not answered for %.0f s; %d metric values kept",
                        client().tracking_uri, down, len(self.pending))
        return len(self.pending)

    def _came_back(self) -> None:
        """Log the recovery and tag the runs whose metrics waited."""
        down, since = time.time() - self.down_since, self.down_since
        self.down_since = None
        note = (f"MLflow did not answer for {down:.0f} s from {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(since))} "
                f"UTC; the metrics logged meanwhile were kept and sent late, with their own steps and times")
        log.warning("tracking recovered: %s", note)
        for run_id in sorted(self.waited):
            try:
                client().set_tag(run_id, DEGRADED_TAG, note)
            except Exception as e:  # the note is a courtesy; the metrics are in
                log.warning("could not tag run %s with %s: %s", run_id, DEGRADED_TAG, e)
        self.waited.clear()


_outbox = _Outbox()


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
