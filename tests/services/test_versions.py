"""Registered models are pinned at deploy and fetched once per machine: moving `champion` does
not change what a running app serves, a restarted replica fetches nothing, and only the served
files are downloaded."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

import corral

pytestmark = pytest.mark.slow


def served_sources(url: str) -> dict[str, str]:
    return {m["id"]: m["root"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]}


def versions_in_cache(name: str) -> dict[str, Path]:
    """{version: its directory} of every cached copy of `name`, and no half-written ones."""
    found = {p.name: p for p in Path(os.environ["CORRAL_MODEL_CACHE"]).glob(f"*/{name}/*")}
    assert not [v for v in found if v.startswith(".")], f"a download was left behind: {found}"
    return found


def chat_replicas() -> list[dict]:
    """The live replicas of the `corral` app's chat deployment, from the GCS actor table (the
    dashboard's state API lags on a loaded machine)."""
    from ray._private.state import actors

    return [a for a in actors().values()
            if a["ActorClassName"].startswith("ServeReplica:corral:chat") and a["State"] == "ALIVE"]


def register(client, name: str, checkpoint: Path) -> str:
    """As the register step does: the checkpoint directory, once (transformers and vLLM read it too)."""
    experiment = client.create_experiment(f"versions-{time.time_ns()}")
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(checkpoint), "model")
    client.set_terminated(run.info.run_id)
    return client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id).version


def test_a_running_app_keeps_its_version_and_a_restarted_replica_fetches_nothing(serve_app, checkpoints, ray_cluster):
    import mlflow
    import ray

    client = mlflow.MlflowClient()
    pinned = served_sources(serve_app.url)["corral-chat"]
    version = client.get_model_version_by_alias("corral-chat", "champion").version
    assert pinned == f"models:/corral-chat/{version}"  # resolved once, at deploy
    cached = versions_in_cache("corral-chat")
    assert set(cached) == {version}
    inode = cached[version].stat().st_ino

    newer = register(client, "corral-chat", checkpoints.base)
    client.set_registered_model_alias("corral-chat", "champion", newer)
    try:
        replica, = chat_replicas()
        ray.kill(ray.get_actor(replica["Name"], namespace="serve"), no_restart=True)
        deadline = time.time() + 180
        while True:  # Serve starts a new replica
            ok = httpx.post(f"{serve_app.v1}/chat/completions", timeout=60, json={
                "model": "corral-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
            if ok.status_code == 200:
                break
            assert time.time() < deadline, ok.text
            time.sleep(1)
        alive = chat_replicas()
        assert alive and all(a["ActorID"] != replica["ActorID"] for a in alive)
        assert served_sources(serve_app.url)["corral-chat"] == pinned  # champion moved; the app did not
        cached = versions_in_cache("corral-chat")
        assert set(cached) == {version} and cached[version].stat().st_ino == inode  # nothing fetched again
    finally:
        client.set_registered_model_alias("corral-chat", "champion", version)


def test_two_machines_worth_of_processes_fetch_a_version_once(ray_cluster, checkpoints):
    import mlflow
    import ray

    from corral.registry import resolve_model

    client = mlflow.MlflowClient()
    if not client.search_registered_models("name = 'corral-fetch'"):
        client.create_registered_model("corral-fetch")
    version = register(client, "corral-fetch", checkpoints.chat)
    fetch = ray.remote(num_cpus=0)(lambda: str(resolve_model(f"models:/corral-fetch/{version}")))
    paths = ray.get([fetch.remote() for _ in range(3)])  # three processes at once
    assert len(set(paths)) == 1
    root = versions_in_cache("corral-fetch")[version]
    fetched = {p.name for p in root.rglob("*") if p.is_file()}
    assert {p.name for p in checkpoints.chat.iterdir()} <= fetched  # the checkpoint, once
    assert not list(root.rglob("hf"))
    assert corral.load_model(paths[0]).config == corral.load_model(checkpoints.chat).config
    assert (root / ".corral-source").read_text().startswith(f"models:/corral-fetch/{version}")
