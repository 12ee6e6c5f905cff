"""Tracking is best-effort for metrics: a real MLflow server stopped and started again on the same
port and stores; what was logged meanwhile arrives with its own steps and times."""

import logging
import time

import pytest
from mlflow.exceptions import MlflowException

from corral import tracking
from tests.conftest import free_port


@pytest.fixture
def outbox(monkeypatch):
    """A fresh outbox, so that a test's outage leaves nothing behind for the next test."""
    box = tracking._Outbox()
    monkeypatch.setattr(tracking, "_outbox", box)
    return box


def test_metrics_logged_while_the_server_is_down_arrive_late_with_their_steps_and_times(
        mlflow_server_process, mlflow_server, outbox, caplog):
    caplog.set_level(logging.WARNING, logger="corral.tracking")
    run_id = tracking.start_run("tracking-outage", "outage")
    tracking.log_metrics(run_id, {"loss": 4.0}, step=1)

    mlflow_server_process.stop()
    try:
        logged_at = {}
        for step in (2, 3, 4):
            t0 = time.time()
            logged_at[step] = int(t0 * 1000)
            tracking.log_metrics(run_id, {"loss": 4.0 - step / 10, "lr": 0.1}, step=step)
            assert time.time() - t0 < 10, "a call during an outage must not wait for MLflow's retries"
        assert len(outbox.pending) == 6 and outbox.down_since is not None
        assert "tracking degraded" in caplog.text and mlflow_server in caplog.text
    finally:
        mlflow_server_process.start()
    tracking.flush()

    assert not outbox.pending and outbox.down_since is None
    history = tracking.client().get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]  # each once
    for m in history:
        if m.step in logged_at:  # the time it was logged, not the time it was sent
            assert abs(m.timestamp - logged_at[m.step]) < 1000, (m.step, m.timestamp, logged_at[m.step])
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx([4.0, 3.8, 3.7, 3.6])
    assert "tracking recovered" in caplog.text
    assert "did not answer" in tracking.client().get_run(run_id).data.tags[tracking.DEGRADED_TAG]
    tracking.end_run(run_id)


def test_an_outage_past_its_bound_fails_loudly_naming_the_server(monkeypatch, outbox):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    monkeypatch.setattr(tracking, "MAX_OUTAGE_S", 1.0)
    tracking.log_metrics("0" * 32, {"loss": 1.0}, step=1)  # kept: the first second of an outage
    assert len(outbox.pending) == 1
    time.sleep(1.2)
    with pytest.raises(tracking.TrackingUnavailable, match=f"{dead}.*has not answered.*MLFLOW_TRACKING_URI"):
        tracking.log_metrics("0" * 32, {"loss": 0.9}, step=2)
    with pytest.raises(tracking.TrackingUnavailable):
        tracking.flush()  # the end of a run does not wait past the bound either


def test_a_server_that_answers_but_refuses_the_metrics_raises_at_once(mlflow_server, outbox):
    with pytest.raises(MlflowException):
        tracking.log_metrics("f" * 32, {"loss": 1.0}, step=1)  # no such run: a real error, not an outage
    assert not outbox.pending and outbox.down_since is None
