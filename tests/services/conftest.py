"""A real Serve deployment of services/configs/local.yaml on the session's Ray cluster, over HTTP.

Two applications from the one config file: `corral` as written (base from a checkpoint path,
chat from the MLflow registry as models:/corral-chat@champion), and `limited` at /limited with
an API key and a tiny request queue, for the auth and overload tests.
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
    from ray.serve.schema import ServeDeploySchema

    port = free_port()
    config = serve_config(checkpoints.base, registered_chat)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # what `serve run CONFIG` / `serve deploy CONFIG` hand to the controller
    serve.context._get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
    deadline = time.time() + 180
    while True:
        apps = serve.status().applications
        states = {name: apps[name].status for name in ("corral", "limited") if name in apps}
        if set(states.values()) == {"RUNNING"} and len(states) == 2:
            break
        failed = {n: apps[n].message for n, s in states.items() if s == "DEPLOY_FAILED"}
        if failed or time.time() > deadline:
            serve.shutdown()
            raise RuntimeError(f"Serve applications did not start: {failed or states}")
        time.sleep(1)
    url = f"http://127.0.0.1:{port}"
    yield SimpleNamespace(url=url, v1=f"{url}/v1", limited=f"{url}/limited/v1", serve=serve)
    serve.shutdown()
