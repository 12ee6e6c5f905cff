"""Run a pipeline spec as a Ray DAG, tracked in MLflow, resumable by fingerprint.

Each step becomes a Ray task that takes the results of the steps it needs as arguments, so Ray
runs independent steps at the same time and each step when its inputs are ready; we do not
schedule. Step tasks take no CPU of
their own: the work inside them (a TorchTrainer, Ray Data) asks Ray for its resources.

A step's fingerprint covers its type, its validated config, its inputs' fingerprints and the
code. A finished MLflow run with the same fingerprint (whose outputs still exist) is reused, so
re-running a spec continues where it failed; `force` reruns a step and everything downstream.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import ray

from corral import tracking
from corral.stack import corral_home
from pipelines.spec import PipelineSpec
from pipelines.steps import step_module

FINGERPRINT_TAG, STEP_TAG, STATUS_TAG, OUTPUTS_TAG = "corral.fingerprint", "corral.step", "corral.status", "corral.outputs"
PIPELINE_TAG = "corral.pipeline"


TOOLING = {"corral/cli.py", "corral/stack.py", "corral/demo.py", "pipelines/cli.py"}  # cannot change a result


def code_version() -> str:
    """sha256 over the source of corral and pipelines: a code change invalidates reuse (except in
    the command-line tooling, which cannot change what a step computes)."""
    import corral
    import pipelines

    h = hashlib.sha256()
    for pkg in (corral, pipelines):
        root = Path(pkg.__file__).parent
        for f in sorted(root.rglob("*.py")):
            name = f"{root.name}/{f.relative_to(root)}"
            if name not in TOOLING:
                h.update(name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


@dataclass
class StepPlan:
    step_id: str
    uses: str
    config: dict
    needs: list[str]
    fingerprint: str
    output_dir: str
    reuse: dict | None = None  # {"run_id", "outputs"} of a finished run with this fingerprint


@dataclass
class StepResult:
    step_id: str
    status: str  # succeeded | reused | failed | skipped
    outputs: dict = field(default_factory=dict)
    run_id: str | None = None
    seconds: float = 0.0
    error: str | None = None


def plan(spec: PipelineSpec, force: tuple[str, ...] = ()) -> list[StepPlan]:
    """Fingerprint every step and find the ones a finished run already did."""
    for f in force:
        if f not in spec.steps:
            raise ValueError(f"--force {f!r}: no such step; steps are {', '.join(spec.steps)}")
    forced = set().union(*(spec.downstream(f) for f in force)) if force else set()
    storage = Path(spec.storage or corral_home() / "pipelines").resolve() / spec.name
    code, fps, plans = code_version(), {}, []
    for sid in spec.order():
        step = spec.steps[sid]
        config = spec.step_config(sid).model_dump(mode="json")
        blob = json.dumps({"uses": step.uses, "config": config, "needs": [fps[n] for n in step.needs],
                           "code": code}, sort_keys=True)
        fps[sid] = hashlib.sha256(blob.encode()).hexdigest()
        out = storage / f"{sid}-{fps[sid][:12]}"
        reuse = None if sid in forced else _finished_run(spec.tracking.experiment, fps[sid], out)
        plans.append(StepPlan(sid, step.uses, config, list(step.needs), fps[sid], str(out), reuse))
    return plans


def _finished_run(experiment: str, fingerprint: str, output_dir: Path) -> dict | None:
    exp = tracking.client().get_experiment_by_name(experiment)
    if exp is None or not output_dir.exists():
        return None
    runs = tracking.client().search_runs(
        [exp.experiment_id], f"tags.`{FINGERPRINT_TAG}` = '{fingerprint}' and tags.`{STATUS_TAG}` = 'succeeded'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    return {"run_id": runs[0].info.run_id, "outputs": json.loads(runs[0].data.tags.get(OUTPUTS_TAG, "{}"))}


@ray.remote(num_cpus=0, max_retries=0)
def run_step(p: StepPlan, experiment: str, parent_run_id: str, *upstream: StepResult) -> StepResult:
    """One step as a Ray task: its own nested MLflow run; failures are returned, not raised."""
    tags = {FINGERPRINT_TAG: p.fingerprint, STEP_TAG: p.step_id, "corral.uses": p.uses}
    blocked = [u.step_id for u in upstream if u.status not in ("succeeded", "reused")]
    if blocked:
        run_id = tracking.start_run(experiment, p.step_id, parent_run_id, tags | {STATUS_TAG: "skipped"})
        tracking.end_run(run_id, "KILLED")
        return StepResult(p.step_id, "skipped", run_id=run_id, error=f"upstream failed: {', '.join(blocked)}")
    if p.reuse:
        tags |= {STATUS_TAG: "reused", "corral.reused_from": p.reuse["run_id"], OUTPUTS_TAG: json.dumps(p.reuse["outputs"])}
        run_id = tracking.start_run(experiment, p.step_id, parent_run_id, tags)
        tracking.end_run(run_id)
        return StepResult(p.step_id, "reused", p.reuse["outputs"], run_id)

    run_id = _step_run(p, experiment, parent_run_id, tags)
    inputs = {k: v for u in upstream for k, v in u.outputs.items()}
    inputs |= {"upstream": {u.step_id: u.outputs for u in upstream}, "output_dir": p.output_dir, "run_id": run_id}
    start = time.time()
    try:
        tracking.client().log_dict(run_id, p.config, "step_config.json")
        outputs = step_module(p.uses).run(p.config, inputs)
    except Exception as e:  # a step's failure is data for the summary, not a crash of the pipeline
        tb = traceback.format_exc()
        tracking.client().set_tag(run_id, STATUS_TAG, "failed")
        tracking.client().set_tag(run_id, "corral.error", f"{type(e).__name__}: {e}"[:5000])
        tracking.end_run(run_id, "FAILED")
        return StepResult(p.step_id, "failed", run_id=run_id, seconds=time.time() - start, error=tb)
    tracking.client().set_tag(run_id, OUTPUTS_TAG, json.dumps(outputs))
    tracking.client().set_tag(run_id, STATUS_TAG, "succeeded")
    tracking.end_run(run_id)
    return StepResult(p.step_id, "succeeded", outputs, run_id, time.time() - start)


def _step_run(p: StepPlan, experiment: str, parent_run_id: str, tags: dict) -> str:
    """The step's MLflow run: an interrupted attempt's run (recorded in its output directory) is
    resumed, so a training step that continues from its checkpoint keeps one metric history."""
    return tracking.recorded_run(p.output_dir, experiment, p.step_id, parent_run_id, tags | {STATUS_TAG: "running"})


def run_pipeline(spec: PipelineSpec, spec_text: str = "", force: tuple[str, ...] = (), log=print) -> list[StepResult]:
    """Execute the spec on the connected Ray cluster; returns one result per step, in order."""
    plans = plan(spec, force)
    exp = spec.tracking.experiment
    parent = tracking.start_run(exp, spec.name, tags={PIPELINE_TAG: spec.name, "corral.git_commit": git_commit(),
                                                      "corral.code_version": code_version()})
    if spec_text:
        tracking.client().log_text(parent, spec_text, "spec.yaml")
    log(f"pipeline {spec.name}: MLflow run {run_link(parent)}")

    # Passing a step's ObjectRef to the steps that need it is the DAG: Ray starts each task when
    # its inputs are ready. (DAGNode.bind/execute would build the same graph but is deprecated in
    # Ray 2.60 in favour of compiled graphs, which are for actor pipelines, not long tasks.)
    refs: dict[str, ray.ObjectRef] = {}
    for p in plans:
        refs[p.step_id] = run_step.remote(p, exp, parent, *[refs[n] for n in p.needs])
    step_of = {ref: sid for sid, ref in refs.items()}
    results: dict[str, StepResult] = {}
    pending, last_progress, shown = list(refs.values()), 0.0, set()
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=5)
            for ref in done:
                r = _result(ref, step_of[ref])
                results[step_of[ref]] = r
                log(f"  {r.step_id:<20} {r.status:<9} {r.seconds:7.1f}s")
            if time.time() - last_progress > 15:
                last_progress = time.time()
                for line in _poll_progress(parent, log):
                    if line not in shown:  # a step that has not logged since the last look: no repeat
                        log(line)
                        shown.add(line)
    except BaseException:  # Ctrl-C, `ray job stop` (SIGTERM): stop the steps, mark the runs KILLED
        for ref in pending:
            ray.cancel(ref, force=True)
        _mark_killed(parent)
        raise

    ordered = [results[p.step_id] for p in plans]
    failed = [r for r in ordered if r.status == "failed"]
    tracking.end_run(parent, "FAILED" if failed else "FINISHED")
    log(summary_table(ordered))
    for r in failed:
        log(f"\nstep {r.step_id} failed:\n{r.error}")
    return ordered


def _result(ref: ray.ObjectRef, step_id: str) -> StepResult:
    """A step task's result; a task that died (its worker, or its own MLflow calls in an outage)
    is that step's failure, not a reason to stop the others."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as e:
        return StepResult(step_id, "failed", error=f"the step's task died: {e}")


def _poll_progress(parent_run_id: str, log) -> list[str]:
    """progress_lines, best-effort: progress is read from MLflow, and an MLflow outage stops
    nothing (logged; the next poll tries again)."""
    if not tracking.server_answers():
        log(f"  progress: MLflow at {tracking.client().tracking_uri} does not answer; tracking is degraded, "
            f"the steps go on (next try in 15 s)")
        return []
    try:
        return progress_lines(parent_run_id)
    except Exception as e:  # noqa: BLE001 - whatever the read hit, the steps go on
        log(f"  progress: reading it from MLflow failed ({type(e).__name__}: {str(e)[:200]}); "
            f"the steps go on (next try in 15 s)")
        return []


def _mark_killed(parent_run_id: str) -> None:
    """An interrupted pipeline: its parent and running step runs end KILLED (a re-run resumes them)."""
    c = tracking.client()
    running = c.search_runs([c.get_run(parent_run_id).info.experiment_id],
                            f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'")
    for run in running:
        c.set_tag(run.info.run_id, STATUS_TAG, "killed")
        tracking.end_run(run.info.run_id, "KILLED")
    tracking.end_run(parent_run_id, "KILLED")


def run_link(run_id: str) -> str:
    run = tracking.client().get_run(run_id)
    return f"{tracking.client().tracking_uri}/#/experiments/{run.info.experiment_id}/runs/{run_id}"


def progress_lines(parent_run_id: str) -> list[str]:
    """step, loss, tokens/s and ETA of the training steps running now (read back from MLflow)."""
    runs = tracking.client().search_runs(
        [tracking.client().get_run(parent_run_id).info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'")
    lines = []
    for run in runs:
        m, params = run.data.metrics, run.data.params
        if "loss" not in m:
            continue
        history = tracking.client().get_metric_history(run.info.run_id, "loss")  # one point per log_every
        first, last = min(history, key=lambda h: h.step), max(history, key=lambda h: h.step)
        total = int(params.get("max_steps_resolved") or params.get("loop.max_steps") or 0)
        eta = ""
        if total and last.step > first.step:
            per_step_s = (last.timestamp - first.timestamp) / 1000 / (last.step - first.step)
            eta = f" ETA {per_step_s * (total - last.step):.0f}s"
        lines.append(f"  {run.data.tags.get(STEP_TAG)}: step {last.step}/{total or '?'} loss {m['loss']:.3f} "
                     f"{m.get('tokens_per_s', 0.0):,.0f} tok/s{eta}")
    return lines


def summary_table(results: list[StepResult]) -> str:
    rows = [("step", "status", "duration", "MLflow run")]
    rows += [(r.step_id, r.status, f"{r.seconds:.1f}s", run_link(r.run_id) if r.run_id else "-") for r in results]
    return _table(rows)


def _table(rows: list[tuple]) -> str:
    rows = [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def plan_table(plans: list[StepPlan], spec: PipelineSpec) -> str:
    rows = [("step", "uses", "needs", "resources", "fingerprint", "action")]
    for p in plans:
        r = spec.steps[p.step_id].resources_config
        res = f"{r.num_workers}x({r.cpus_per_worker} CPU, {r.gpus_per_worker} GPU{', ' + r.accelerator_type if r.accelerator_type else ''})"
        action = f"reuse {p.reuse['run_id'][:8]}" if p.reuse else "run"
        rows.append((p.step_id, p.uses, ",".join(p.needs) or "-", res, p.fingerprint[:12], action))
    return _table(rows)


def _pipeline_runs(experiment: str | None, max_results: int = 20):
    c = tracking.client()
    exps = [c.get_experiment_by_name(experiment)] if experiment else c.search_experiments()
    ids = [e.experiment_id for e in exps if e is not None]
    if not ids:
        return []
    return c.search_runs(ids, f"tags.`{PIPELINE_TAG}` != ''", order_by=["attributes.start_time DESC"],
                         max_results=max_results)


def list_table(experiment: str | None = None) -> str:
    runs = _pipeline_runs(experiment)
    rows = [("run id", "pipeline", "status", "started")]
    rows += [(r.info.run_id, r.data.tags[PIPELINE_TAG], r.info.status,
              time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.info.start_time / 1000))) for r in runs]
    return _table(rows) if runs else "no pipeline runs recorded yet"


def status_table(run_id: str | None = None, experiment: str | None = None) -> str:
    c = tracking.client()
    if run_id is None:
        runs = _pipeline_runs(experiment, 1)
        if not runs:
            return "no pipeline runs recorded yet"
        run_id = runs[0].info.run_id
    parent = c.get_run(run_id)
    steps = c.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'",
                          order_by=["attributes.start_time ASC"])
    rows = [("step", "status", "duration", "MLflow run")]
    for s in steps:
        end = s.info.end_time or time.time() * 1000
        rows.append((s.data.tags.get(STEP_TAG, s.info.run_name), s.data.tags.get(STATUS_TAG, s.info.status.lower()),
                     f"{(end - s.info.start_time) / 1000:.1f}s", run_link(s.info.run_id)))
    head = f"pipeline {parent.data.tags.get(PIPELINE_TAG)} ({parent.info.status}) {run_link(run_id)}"
    return head + "\n" + _table(rows)
