"""Engine faults over HTTP: a failing forward fails only its request, and an engine that cannot go
on turns /health and Serve's health check red until Serve replaces the replica.

The model server here is the product's, with its model wrapped so that the test can make a
forward raise (as an out-of-memory would) from inside the replica.
"""

from __future__ import annotations

import os
import sys
import time

import httpx
import pytest
import torch

pytestmark = pytest.mark.slow

POISON = 4000  # a forward over this token id raises


class PoisonedModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.broken = model, model.config, False

    def forward(self, tokens, layout=None, cache=None):
        if self.broken or bool((tokens == POISON).any()):
            raise RuntimeError("simulated device fault")
        return self.model(tokens, layout, cache)


@pytest.fixture(scope="module")
def faulty(serve_app, checkpoints):
    """An app `faulty` at /faulty: the product's ingress and model server, the model poisoned."""
    from ray import cloudpickle, serve

    from services.app import ModelServer, OpenAIServer

    class FaultyServer(ModelServer.func_or_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.engine.model = PoisonedModel(self.engine.model)

        def break_engine(self) -> None:
            self.engine.model.broken = True

        def pid(self) -> int:
            return os.getpid()

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the replicas need this module's classes
    model = serve.deployment(FaultyServer, name="faulty-model", health_check_period_s=1, health_check_timeout_s=10,
                             ray_actor_options={"num_cpus": 0.5})
    bound = model.bind(model=str(checkpoints.base), served_name="faulty-base", max_batch_size=4)
    handle = serve.run(OpenAIServer.bind((bound, "faulty-base", str(checkpoints.base)), None, [], 1 << 20),
                       name="faulty", route_prefix="/faulty")
    yield serve_app.url + "/faulty", serve.get_deployment_handle("faulty-model", app_name="faulty")
    serve.delete("faulty")
    del handle


def complete(url: str, prompt) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": "faulty-base", "prompt": prompt, "max_tokens": 4},
                      timeout=60)


def test_a_failing_forward_fails_its_request_and_the_next_one_succeeds(faulty):
    url, handle = faulty
    pid = handle.pid.remote().result()
    failed = complete(url, [1, 5, POISON])
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "engine_error", failed.text
    assert "simulated device fault" in failed.json()["error"]["message"]
    ok = complete(url, "The king said")
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
    assert httpx.get(f"{url}/health", timeout=30).json() == {"status": "ok"}
    assert handle.pid.remote().result() == pid  # the same replica served on


def test_an_engine_that_cannot_continue_is_replaced(faulty):
    url, handle = faulty
    pid = handle.pid.remote().result()
    handle.break_engine.remote().result()
    for _ in range(3):  # three failed forwards in a row: the engine stops
        failed = complete(url, "The king said")
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "engine_error", failed.text
    health = httpx.get(f"{url}/health", timeout=30)
    if health.status_code == 503:  # unless Serve has already replaced it
        assert "forwards in a row failed" in health.json()["models"]["faulty-base"]
    else:
        assert handle.pid.remote().result(timeout_s=30) != pid
    deadline = time.time() + 180
    while True:  # Serve's health check fails, and Serve starts a new replica
        try:
            if handle.pid.remote().result(timeout_s=10) != pid and httpx.get(f"{url}/health", timeout=30).status_code == 200:
                break
        except Exception:  # the old replica is gone, the new one not yet up
            pass
        assert time.time() < deadline, "Serve did not replace the replica whose engine stopped"
        time.sleep(1)
    ok = complete(url, "The king said")
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
