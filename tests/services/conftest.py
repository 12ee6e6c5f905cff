"""A real Serve deployment of services/configs/local.yaml on the session's Ray cluster, over HTTP.

Two applications from the one config file: `corral` as written (base from a checkpoint path,
chat from the MLflow registry as models:/corral-chat@champion), and `limited` at /limited with
an API key and a tiny request queue, for the auth and overload tests. Tests that run against
both engines (`engine_app`) add a third, `vllm` at /vllm: the same models on `engine: vllm`.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.conftest import REPO, free_port

API_KEY = "sk-corral-test"
LIMITED_QUEUE = {"max_ongoing_requests": 2, "max_queued_requests": 2}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tokenizer) -> SimpleNamespace:
    """Tiny base and chat checkpoints with random weights and the session tokenizer."""
    import corral
    from corral.config import ModelConfig
    from corral.model import Transformer

    root = tmp_path_factory.mktemp("serve-models")
    tiny = ModelConfig.preset("tiny")
    base = corral.save_model(Transformer(tiny).init_weights(seed=0), root / "base", tokenizer)
    chat = corral.save_model(Transformer(tiny).init_weights(seed=1), root / "chat", tokenizer)
    return SimpleNamespace(base=base, chat=chat)


@pytest.fixture(scope="session")
def registered_chat(mlflow_server, checkpoints) -> str:
    """The chat checkpoint logged to a run and registered as corral-chat with alias champion."""
    import mlflow

    client = mlflow.MlflowClient()
    experiment = client.create_experiment(f"serve-tests-{time.time_ns()}")
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(checkpoints.chat), "checkpoint")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("corral-chat")
    version = client.create_model_version("corral-chat", f"{run.info.artifact_uri}/checkpoint", run.info.run_id)
    client.set_registered_model_alias("corral-chat", "champion", version.version)
    return "models:/corral-chat@champion"


def serve_config(base: Path, chat: str) -> dict:
    """local.yaml with the two model sources filled in, plus the `limited` application."""
    config = yaml.safe_load((REPO / "services/configs/local.yaml").read_text())
    app = config["applications"][0]
    app["args"]["base"]["model"] = str(base)
    app["args"]["chat"]["model"] = chat
    limited = copy.deepcopy(app)
    limited.update(name="limited", route_prefix="/limited")
    limited["args"] = {"base": app["args"]["base"], "api_keys": [API_KEY]}
    limited["deployments"] = [d | (LIMITED_QUEUE if d["name"] == "base" else {})
                              for d in limited["deployments"] if d["name"] != "chat"]
    config["applications"].append(limited)
    return config


@pytest.fixture(scope="session")
def serve_app(ray_cluster, checkpoints, registered_chat):
    """Serve's HTTP proxy on a free port with both applications RUNNING; shut down at the end."""
    from ray import serve

    port = free_port()
    config = serve_config(checkpoints.base, registered_chat)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    deploy(config, timeout_s=180)
    url = f"http://127.0.0.1:{port}"
    yield SimpleNamespace(url=url, v1=f"{url}/v1", limited=f"{url}/limited/v1", serve=serve, config=config,
                          app="corral")
    serve.shutdown()


def deploy(config: dict, timeout_s: float) -> None:
    """Hand `config` to the Serve controller, as `serve deploy` does, and wait until all its
    applications run (applications already running and unchanged stay as they are)."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    serve.context._get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
    names = [app["name"] for app in config["applications"]]
    deadline = time.time() + timeout_s
    while True:
        apps = serve.status().applications
        states = {name: apps[name].status for name in names if name in apps}
        if set(states.values()) == {"RUNNING"} and len(states) == len(names):
            return
        failed = {n: apps[n].message for n, s in states.items() if s == "DEPLOY_FAILED"}
        if failed or time.time() > deadline:
            serve.shutdown()
            raise RuntimeError(f"Serve applications did not start: {failed or states}")
        time.sleep(1)


def add_application(serve_app, app: dict, timeout_s: float) -> None:
    """Deploy `app` beside the session's applications. Serve's config is declarative (an application
    left out of it is deleted), so each one added stays in the session's config until removed."""
    serve_app.config["applications"].append(app)
    deploy(serve_app.config, timeout_s)


def remove_application(serve_app, name: str) -> None:
    serve_app.config["applications"] = [a for a in serve_app.config["applications"] if a["name"] != name]
    serve_app.serve.delete(name)


# the vLLM engine's test settings: a small KV cache on this shared machine, and no compile step at start-up
VLLM_TEST_ARGS = {"kv_cache_memory_bytes": 64 << 20, "enforce_eager": True}


@pytest.fixture(scope="session")
def vllm_app(serve_app):
    """The `corral` application's models on `engine: vllm`, as application `vllm` at /vllm."""
    app = copy.deepcopy(serve_app.config["applications"][0])
    app.update(name="vllm", route_prefix="/vllm")
    for role in ("base", "chat"):
        app["args"][role] |= {"engine": "vllm", "vllm": VLLM_TEST_ARGS}
    start = time.perf_counter()
    add_application(serve_app, app, timeout_s=900)  # vLLM's start-up on a loaded 2-core machine takes minutes
    print(f"\nvLLM application start-up: {time.perf_counter() - start:.0f} s")
    url = f"{serve_app.url}/vllm"
    return SimpleNamespace(url=url, v1=f"{url}/v1", serve=serve_app.serve, app="vllm")


@pytest.fixture(scope="module", params=["corral", "vllm"])
def engine_app(request):
    """The Serve application of each engine in turn: tests using it run against both."""
    return request.getfixturevalue("serve_app" if request.param == "corral" else "vllm_app")
