"""Fixtures shared by the whole suite: the demo corpus, a trained tokenizer, tiny configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def corpus_dir() -> Path:
    """The Gutenberg texts: ../shared/data/gutenberg beside the checkout, or $CORRAL_CORPUS_DIR."""
    for candidate in (os.environ.get("CORRAL_CORPUS_DIR"), REPO.parent / "shared/data/gutenberg"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    pytest.skip("demo corpus not found: set CORRAL_CORPUS_DIR or run `corral data fetch-demo DIR`")


@pytest.fixture(scope="session")
def corpus() -> Path:
    return corpus_dir()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus):
    """A 4096-piece tokenizer trained once per session on a few plays (the tiny preset's vocab)."""
    from corral.tokenizer import train_tokenizer

    files = sorted(corpus.glob("*_gut.txt"))[:8]
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(files, vocab_size=4096, out_dir=out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from corral.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def prepare_plays(corpus: Path, tokenizer_dir: Path, root: Path, n: int = 12, **config) -> Path:
    """The first `n` plays through the prepare_data step (on the session's Ray cluster) into
    `root / "data"`; `config` adds to the step's config."""
    import shutil

    from pipelines.steps import prepare_data

    src = root / "corpus"
    src.mkdir()
    for f in sorted(corpus.glob("*_gut.txt"))[:n]:
        shutil.copy(f, src / f.name)
    return Path(prepare_data.run({"inputs": [str(src)], **config},
                                 {"tokenizer": str(tokenizer_dir), "output_dir": str(root / "data")})["data"])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on SQLite with served artifacts; `stop()` and `start()` again on the
    same port and stores stage an outage."""

    def __init__(self, home: Path):
        self.home, self.port = home, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        import time
        import urllib.request

        from corral.stack import start_mlflow_server

        log = open(self.home / "server.log", "a")
        self.proc = start_mlflow_server(self.port, self.home / "mlflow.db", self.home / "artifacts", log)
        deadline = time.time() + 300  # a loaded 2-core machine takes minutes
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.proc.kill()
                    raise RuntimeError(f"mlflow server did not start; see {self.home / 'server.log'}")
                time.sleep(0.5)

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture(scope="session")
def mlflow_server_process(tmp_path_factory) -> MlflowServer:
    """The session's MLflow server itself; a test that stops it must start it again."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(mlflow_server_process):
    """The session's MLflow server's URI, exported as MLFLOW_TRACKING_URI for the whole session."""
    uri = mlflow_server_process.uri
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


def stop_process(proc, grace: float = 30) -> None:
    """SIGTERM, then SIGKILL if it is still there after `grace` seconds."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)


@pytest.fixture(scope="session")
def ray_cluster(mlflow_server, tmp_path_factory):
    """One local Ray cluster for the whole session; its workers see the MLflow server.

    12 logical CPUs on 2 cores: training workers, data actors and Serve replicas mostly wait on
    each other, and the suite needs them scheduled together. The services tests hold the most at
    once: the session's applications (corral, limited, vllm: 3.25 CPUs) and the guard module's
    three (2 each, the deployments' defaults); 8 left the third waiting for a CPU forever. The
    dashboard serves Ray's state API (the fault test finds a training worker through it).
    """
    import ray

    from corral.stack import WORKER_PRIORITY

    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")  # a loaded 2-core machine starts slowly
    os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "300")
    os.environ.update(WORKER_PRIORITY)  # as `corral up`: training workers at the driver's priority
    # replicas download registered models into this session's own cache, not ~/.cache
    os.environ["CORRAL_MODEL_CACHE"] = str(tmp_path_factory.mktemp("model-cache"))
    # Ray's state API (used by Ray Train's own actors too) finds "the" cluster through the last one
    # started on this machine unless told; other tests start clusters of their own, so say which.
    dashboard = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard}"
    passed = {var: os.environ[var] for var in ("CORRAL_MODEL_CACHE", "RAY_API_SERVER_ADDRESS")}
    ray.init(address="local", num_cpus=12, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard,
             log_to_driver=True, runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": mlflow_server, **passed}})
    yield ray
    ray.shutdown()
    os.environ.pop("RAY_API_SERVER_ADDRESS")


@pytest.fixture(autouse=True, scope="module")
def no_leftover_ray_resources(request):
    """After each module on the session's cluster, nothing of the module's may go on holding its
    CPUs: a placement group or an actor left behind would starve every later module (a training
    run waiting for its workers forever). Serve's actors (the session's applications) are exempt.
    Leftovers are named on stderr, where pytest's capture does not hide them, and removed."""
    yield
    import signal
    import sys

    import ray

    if not ray.is_initialized():
        return
    from ray.util.placement_group import PlacementGroup, remove_placement_group
    from ray.util.state import list_actors

    left = []
    for pg_id, pg in ray.util.placement_group_table().items():
        if pg["state"] != "REMOVED":
            left.append(f"placement group {pg['name'] or pg_id} ({pg['state']}, {pg['bundles']})")
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
    try:
        actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000, timeout=30,
                             raise_on_missing_output=False)
    except Exception as e:  # the check must not fail the module it follows
        actors = []
        left.append(f"(the actors could not be listed: {e})")
    for actor in actors:
        needs = actor.required_resources or {}
        if actor.ray_namespace != "serve" and (needs.get("CPU") or needs.get("GPU")):
            left.append(f"actor {actor.class_name} pid {actor.pid} ({needs})")
            if actor.name:
                ray.kill(ray.get_actor(actor.name, namespace=actor.ray_namespace))
            else:
                os.kill(actor.pid, signal.SIGKILL)
    if left:
        sys.__stderr__.write(f"\nleft on the Ray cluster after {request.module.__name__}, now removed:\n  "
                             + "\n  ".join(left) + "\n")
