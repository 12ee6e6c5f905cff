"""Engine faults over HTTP: a failing forward fails only its request, and an engine that cannot go
on turns /health and Serve's health check red until Serve replaces the replica.

The model servers here are the product's with test hooks: one runs its engine in the replica's
process with the model wrapped, so that the test can make a forward raise (as an out-of-memory
would); the other runs it in a child process (the default), which the test kills.
"""

from __future__ import annotations

import os
import signal
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


def deploy(serve_app, checkpoints, server_class, name: str, **kwargs):
    """An app `name` at /name: the product's ingress and `server_class` (the product's model server
    with test hooks); returns its URL and a handle to the model server."""
    from ray import cloudpickle, serve

    from services.app import OpenAIServer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the replicas need this module's classes
    model = serve.deployment(server_class, name=f"{name}-model", health_check_period_s=1, health_check_timeout_s=10,
                             ray_actor_options={"num_cpus": 0.5})
    bound = model.bind(model=str(checkpoints.base), served_name=f"{name}-base", max_batch_size=4, **kwargs)
    serve.run(OpenAIServer.bind((bound, f"{name}-base", str(checkpoints.base)), None, [], 1 << 20),
              name=name, route_prefix=f"/{name}")
    return serve_app.url + f"/{name}", serve.get_deployment_handle(f"{name}-model", app_name=name)


def server_classes():
    from services.app import ModelServer

    class FaultyServer(ModelServer.func_or_class):
        """The model poisoned: the engine runs in the replica's process, so the test can reach it."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, engine_process=False, **kwargs)
            self.engine.model = PoisonedModel(self.engine.model)

        def break_engine(self) -> None:
            self.engine.model.broken = True

        def pid(self) -> int:
            return os.getpid()

    class KillableServer(ModelServer.func_or_class):
        """The product's default: the engine in a child process, which the test kills."""

        def kill_engine(self) -> None:
            os.kill(self.engine._process.pid, signal.SIGKILL)

        def pid(self) -> int:
            return os.getpid()

    return FaultyServer, KillableServer


@pytest.fixture(scope="module")
def faulty(serve_app, checkpoints):
    from ray import serve

    yield deploy(serve_app, checkpoints, server_classes()[0], "faulty")
    serve.delete("faulty")


@pytest.fixture(scope="module")
def killable(serve_app, checkpoints):
    from ray import serve

    yield deploy(serve_app, checkpoints, server_classes()[1], "killable")
    serve.delete("killable")


def complete(url: str, prompt) -> httpx.Response:
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return httpx.post(f"{url}/v1/completions", json={"model": f"{name}-base", "prompt": prompt, "max_tokens": 4},
                      timeout=60)


def wait_until_replaced(url: str, handle, pid: int) -> None:
    """Serve's health check fails, Serve starts a new replica, and it serves."""
    deadline = time.time() + 180
    while True:
        try:
            replaced = handle.pid.remote().result(timeout_s=10) != pid
            if replaced and httpx.get(f"{url}/health", timeout=30).status_code == 200:
                break
        except Exception:  # the old replica is gone, the new one not yet up
            pass
        assert time.time() < deadline, "Serve did not replace the replica whose engine stopped"
        time.sleep(1)
    ok = complete(url, "The king said")
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


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
    wait_until_replaced(url, handle, pid)


def test_an_engine_process_that_dies_fails_requests_and_its_replica_is_replaced(killable):
    url, handle = killable
    pid = handle.pid.remote().result()
    assert complete(url, "The king said").status_code == 200
    handle.kill_engine.remote().result()
    failed = complete(url, "The king said")
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "engine_error", failed.text
    assert "engine process exited" in failed.json()["error"]["message"]
    health = httpx.get(f"{url}/health", timeout=30)
    if health.status_code == 503:  # unless Serve has already replaced it
        assert "engine process exited" in health.json()["models"]["killable-base"]
    wait_until_replaced(url, handle, pid)
