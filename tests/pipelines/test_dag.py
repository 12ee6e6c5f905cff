"""The pipeline runner on a real Ray cluster with a real MLflow server: concurrency, lineage,
reuse by fingerprint, --force, and a failing step that skips its dependents."""

import os
import subprocess
import sys

import pytest
import yaml

from corral import tracking
from pipelines import dag
from pipelines.spec import validate_spec


@pytest.fixture(scope="module")
def spec_raw(corpus, tmp_path_factory):
    storage = tmp_path_factory.mktemp("pipelines")
    plays = [str(corpus / f) for f in ("hamlet_gut.txt", "lear_gut.txt", "macbeth_gut.txt", "othello_gut.txt")]
    # the tokenizers train on the whole corpus: long enough (seconds) to outlast a worker's start-up
    return {"name": "dag-test", "tracking": {"experiment": "dag-test"}, "storage": str(storage), "steps": {
        "tok_a": {"uses": "tokenizer", "config": {"inputs": [str(corpus)], "vocab_size": 12000}},
        "tok_b": {"uses": "tokenizer", "config": {"inputs": [str(corpus)], "vocab_size": 11000}},
        "data": {"uses": "prepare_data", "needs": ["tok_a"], "config": {"inputs": plays[:1], "seq_len": 64}},
    }}


def statuses(results):
    return {r.step_id: r.status for r in results}


def warm_workers(ray, n: int = 3) -> None:
    """Idle workers with corral imported, so the overlap below measures Ray running two steps at
    once, not how long a loaded machine takes to start a Python worker."""

    @ray.remote(num_cpus=0)
    def warm():
        import time

        import pipelines.dag  # noqa: F401  (the step task's imports)

        time.sleep(2)
        return os.getpid()

    assert len(set(ray.get([warm.remote() for _ in range(n)]))) == n


def test_runs_tracks_reuses_and_forces(ray_cluster, mlflow_server, spec_raw):
    spec = validate_spec(spec_raw)
    warm_workers(ray_cluster)
    first = dag.run_pipeline(spec, yaml.safe_dump(spec_raw), log=lambda *_: None)
    assert statuses(first) == {"tok_a": "succeeded", "tok_b": "succeeded", "data": "succeeded"}

    # lineage: one parent run, a nested run per step tagged with its fingerprint and outputs
    client = tracking.client()
    runs = {r.step_id: client.get_run(r.run_id) for r in first}
    parent_ids = {run.data.tags[tracking.PARENT_TAG] for run in runs.values()}
    assert len(parent_ids) == 1
    parent = client.get_run(parent_ids.pop())
    assert parent.data.tags[dag.PIPELINE_TAG] == "dag-test" and parent.info.status == "FINISHED"
    plans = {p.step_id: p for p in dag.plan(spec)}
    for sid, run in runs.items():
        assert run.data.tags[dag.FINGERPRINT_TAG] == plans[sid].fingerprint
        assert run.info.status == "FINISHED"
    assert (first[2].outputs["data"] and os.path.isdir(first[2].outputs["data"]))
    # the two independent tokenizers ran at the same time
    a, b = runs["tok_a"].info, runs["tok_b"].info
    assert a.start_time < b.end_time and b.start_time < a.end_time

    again = dag.run_pipeline(spec, log=lambda *_: None)
    assert statuses(again) == {"tok_a": "reused", "tok_b": "reused", "data": "reused"}
    assert again[2].outputs == first[2].outputs

    forced = dag.run_pipeline(spec, force=("tok_a",), log=lambda *_: None)
    assert statuses(forced) == {"tok_a": "succeeded", "tok_b": "reused", "data": "succeeded"}


def test_a_changed_config_changes_the_fingerprint_downstream(spec_raw):
    spec = validate_spec(spec_raw)
    changed = validate_spec({**spec_raw, "steps": {**spec_raw["steps"], "tok_a": {
        "uses": "tokenizer", "config": {**spec_raw["steps"]["tok_a"]["config"], "vocab_size": 2100}}}})
    before = {p.step_id: p.fingerprint for p in dag.plan(spec)}
    after = {p.step_id: p.fingerprint for p in dag.plan(changed)}
    assert before["tok_b"] == after["tok_b"]
    assert before["tok_a"] != after["tok_a"] and before["data"] != after["data"]


def test_failed_step_skips_dependents_and_the_cli_exits_non_zero(ray_cluster, mlflow_server, spec_raw, tmp_path):
    raw = {**spec_raw, "name": "dag-fail", "steps": {
        "tok": {"uses": "tokenizer", "config": {"inputs": [str(tmp_path / "missing.txt")], "vocab_size": 500}},
        "data": {"uses": "prepare_data", "needs": ["tok"], "config": {"inputs": [str(tmp_path)]}},
        "tok_ok": spec_raw["steps"]["tok_b"],
    }}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    r = subprocess.run([sys.executable, "-m", "corral.cli", "pipeline", "run", str(tmp_path / "spec.yaml")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr
    rows = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines()
            if line.split()[:1] in (["tok"], ["data"], ["tok_ok"]) and "http" in line}
    assert rows == {"tok": "failed", "data": "skipped", "tok_ok": "succeeded"}
    assert "missing.txt does not exist" in r.stdout

    r = subprocess.run([sys.executable, "-m", "corral.cli", "pipeline", "status", "--experiment", "dag-test"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "dag-fail (FAILED)" in r.stdout and "skipped" in r.stdout


def test_progress_lines_read_the_step_total_and_eta_from_mlflow(mlflow_server):
    from mlflow.entities import Metric, Param

    parent = tracking.start_run("progress-test", "pipeline")
    child = tracking.start_run("progress-test", "sft", parent_run_id=parent, tags={dag.STEP_TAG: "sft"})
    tracking.client().log_batch(child, params=[Param("loop.max_steps", "1000"), Param("max_steps_resolved", "300")])
    # loss logged every 10 steps, one second apart: 0.1 s a step
    tracking.client().log_batch(child, metrics=[Metric("loss", 2.0 - s / 100, 1_000_000 + s * 100, s)
                                                for s in (10, 20, 30)] + [Metric("tokens_per_s", 900.0, 1_003_000, 30)])
    [line] = dag.progress_lines(parent)
    assert line.strip() == "sft: step 30/300 loss 1.700 900 tok/s ETA 27s", line
