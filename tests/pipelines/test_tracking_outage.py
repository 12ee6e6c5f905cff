"""An MLflow outage in the middle of pretraining, on a real stack (the session's Ray cluster and
MLflow server): the server is stopped for 60 s and started again on the same port and stores.

Tracking is best-effort for training: the pipeline goes on, no step is cancelled, the training
workers are not restarted, and every step's metrics reach MLflow once it is back.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from corral import tracking
from pipelines import dag
from pipelines.spec import validate_spec
from tests.pipelines.test_pretrain import prepared  # noqa: F401 - the prepared corpus, as a fixture here

pytestmark = pytest.mark.slow
OUTAGE_S = 60
MAX_STEPS = 400  # ~0.2-0.5 s a step here: training outlasts the outage and the server's restart


def pretrain_run(experiment: str):
    exp = tracking.client().get_experiment_by_name(experiment)
    runs = tracking.client().search_runs([exp.experiment_id], f"tags.`{dag.STEP_TAG}` = 'pretrain'") if exp else []
    return runs[0] if runs else None


def worker_logs_since(t0: float) -> str:
    """What Ray's workers wrote to their stderr since t0: the log of the run's training workers."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return "".join(f.read_text(errors="replace") for f in logs.glob("worker-*.err") if f.stat().st_mtime >= t0)


def test_pretraining_goes_on_through_a_60_s_mlflow_outage(ray_cluster, mlflow_server, mlflow_server_process,
                                                          prepared, corpus, tmp_path):  # noqa: F811
    experiment = "tracking-outage"
    spec = validate_spec({"name": "outage", "tracking": {"experiment": experiment}, "storage": str(tmp_path), "steps": {
        # an independent step beside the training: the outage must cancel neither
        "tokenizer": {"uses": "tokenizer", "config": {"inputs": [str(corpus / "hamlet_gut.txt")], "vocab_size": 1000}},
        "pretrain": {"uses": "pretrain", "resources": {"num_workers": 2}, "config": {
            "model": "tiny", "data_dir": prepared,
            "loop": {"micro_batch_size": 4, "max_steps": MAX_STEPS, "eval_every": 1000, "eval_batches": 2,
                     "checkpoint_every": 100, "max_failures": 2},
            "deepspeed": {"zero_stage": 3, "bf16": True}, "optim": {"lr": 3e-3, "warmup_steps": 5}}},
    }})
    t_start, lines, box = time.time(), [], {}

    def target():
        try:
            box["results"] = dag.run_pipeline(spec, log=lines.append)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.time() + 900
    while True:  # training is under way: some steps logged
        run = pretrain_run(experiment)
        if run is not None and len(tracking.client().get_metric_history(run.info.run_id, "loss")) >= 5:
            break
        assert thread.is_alive() and time.time() < deadline, (box, lines)
        time.sleep(1)
    run_id = run.info.run_id

    before = len(tracking.client().get_metric_history(run_id, "loss"))
    t_stop = time.time()
    mlflow_server_process.stop()
    try:
        time.sleep(max(0.0, t_stop + OUTAGE_S - time.time()))
        t_restart = time.time()
    finally:
        mlflow_server_process.start()
    t_back = time.time()
    thread.join(timeout=900)
    assert not thread.is_alive(), "the pipeline did not finish"
    assert "error" not in box, box.get("error")

    results = {r.step_id: r.status for r in box["results"]}
    assert results == {"tokenizer": "succeeded", "pretrain": "succeeded"}, (results, lines)
    client = tracking.client()
    parent = client.get_run(client.get_run(run_id).data.tags[tracking.PARENT_TAG])
    assert parent.info.status == "FINISHED"

    history = client.get_metric_history(run_id, "loss")
    steps = sorted(m.step for m in history)
    assert steps == list(range(1, MAX_STEPS + 1)), "every step's loss in MLflow, each once (no replay)"
    assert not client.get_metric_history(run_id, "resumed_from"), "the worker group was restarted"
    # the steps went on while the server was down: logged then (their own times), sent later
    during = sorted(m.step for m in history if t_stop * 1000 <= m.timestamp <= t_restart * 1000)
    assert len(during) >= 10, f"training stalled during the outage: steps {during}"

    assert "did not answer" in client.get_run(run_id).data.tags[tracking.DEGRADED_TAG]
    assert "tracking degraded" in worker_logs_since(t_start), "the training run's log must say tracking is degraded"
    assert any("does not answer" in line for line in lines), lines  # the runner's progress poll, not cancelled
    print(f"\noutage {t_restart - t_stop:.0f} s (server back after {t_back - t_stop:.0f} s); loss points in MLflow "
          f"before the outage {before}, after {len(history)}; steps logged during the outage "
          f"{during[0]}-{during[-1]} ({len(during)})")
