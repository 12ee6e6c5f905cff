"""The tiny pipeline as a user runs it: `corral up`, `ray job submit`, `ray job stop`, re-submit,
and the registered models loaded back; then `corral down` leaves nothing running.

Runs before the rest of the suite's Ray cluster exists (tests/e2e sorts first) and uses its own
ports, so it never shares a Ray head with other tests."""

import contextlib
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml

import corral
from tests.conftest import corpus_dir, free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def cli(*args, env, timeout=900, check=True):
    r = subprocess.run([str(BIN / args[0]), *map(str, args[1:])], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{args}: {r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("corral-home")
    # HOME too: a fresh machine's, without the ~/.ray/auth_token that Ray's token auth needs
    env = {**os.environ, "CORRAL_HOME": str(home), "HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    ports = [free_port() for _ in range(4)]
    cli("corral", "up", "--ray-port", ports[0], "--dashboard-port", ports[1], "--mlflow-port", ports[2],
        "--agent-port", ports[3], "--num-cpus", 6, env=env)
    cli("corral", "up", "--ray-port", ports[0], "--dashboard-port", ports[1], "--mlflow-port", ports[2],
        "--agent-port", ports[3], env=env)  # twice is harmless
    assert (home / ".ray" / "auth_token").is_file()  # made by `corral up`: Ray refuses to start without one
    state = json.loads((home / "stack.json").read_text())
    server = psutil.Process(state["mlflow_pid"])  # without MLflow's job runner: its consumers poll all day
    assert not [p for p in server.children(recursive=True) if "mlflow.server.jobs" in " ".join(p.cmdline())]
    env |= {"RAY_ADDRESS": f"127.0.0.1:{ports[0]}", "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{ports[1]}",
            "RAY_AUTH_MODE": "token", "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports[2]}"}
    # the agents rename themselves ("ray::DashboardAgent"): only their process group says whose they are
    assert {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= {p.name() for p in head_processes(state)}
    yield env
    cli("corral", "down", env=env)
    leftovers = [" ".join(p.cmdline())[:80] for p in head_processes(state)]
    assert not leftovers, f"corral down left {len(leftovers)} Ray processes: {leftovers}"
    assert not psutil.pid_exists(state["mlflow_pid"]) or psutil.Process(state["mlflow_pid"]).status() == "zombie", \
        "corral down left the MLflow server running"


def head_processes(state: dict) -> list[psutil.Process]:
    def ours(p):
        with contextlib.suppress(psutil.Error):
            return os.getpgid(p.pid) == state["ray_pgid"] or any(state["ray_session"] in a for a in p.cmdline())
    return [p for p in psutil.process_iter() if ours(p)]


def stack_sockets(state: dict) -> set[tuple[str, int, str]]:
    """(address, port, command) of every listening socket of the stack's processes: the Ray head's
    (its process group or session, and all they started: workers, job drivers) and MLflow's."""
    procs = {p.pid: p for p in head_processes(state)}
    for p in list(procs.values()):
        with contextlib.suppress(psutil.Error):
            procs |= {c.pid: c for c in p.children(recursive=True)}
    for p in psutil.process_iter():
        with contextlib.suppress(OSError, psutil.Error):
            if os.getpgid(p.pid) == state["mlflow_pid"]:  # the server and its uvicorn workers
                procs[p.pid] = p
    found = set()
    for c in psutil.net_connections(kind="inet"):
        if c.pid in procs and (c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr)):
            with contextlib.suppress(psutil.Error):
                command = " ".join(procs[c.pid].cmdline()).split() or [procs[c.pid].name()]
                found.add((c.laddr.ip, c.laddr.port, command[0]))
    return found


SOCKETS_SEEN: set[tuple[str, int, str]] = set()  # sampled while the pipeline trains, checked at the end


def short_spec(tmp: Path) -> Path:
    """The tiny spec cut to tokenizer -> data -> pretrain -> sft -> register, with few steps."""
    spec = yaml.safe_load((REPO / "pipelines/specs/llama2-tiny.yaml").read_text().replace("${CORRAL_HOME}/data/gutenberg", str(corpus_dir())))
    steps = spec["steps"]
    steps["pretrain"]["config"]["loop"] = {"micro_batch_size": 8, "max_steps": 40, "eval_every": 20,
                                           "checkpoint_every": 10, "eval_batches": 2}
    steps["sft"]["config"] |= {"tasks": {"train_size": 400, "eval_size": 40}, "epochs": 1}
    steps["sft"]["config"]["loop"] |= {"eval_every": 20, "checkpoint_every": 20}
    steps["register"]["config"] = {"models": [{"name": "e2e-base", "from_step": "pretrain"},
                                              {"name": "e2e-chat", "from_step": "sft"}]}
    steps["register"]["needs"] = ["pretrain", "sft"]
    spec["steps"] = {k: steps[k] for k in ("tokenizer", "data", "pretrain", "sft", "register")}
    spec["name"], spec["tracking"] = "e2e-tiny", {"experiment": "e2e-tiny"}
    path = tmp / "e2e-tiny.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def submit(env, spec: Path, wait=True):
    args = ["ray", "job", "submit", "--working-dir", ".", "--runtime-env-json",
            json.dumps({"env_vars": {"CORRAL_HOME": env["CORRAL_HOME"], "MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"]}})]
    if not wait:
        args.append("--no-wait")
    # no retry: `corral up` returns only once the job agent answers
    return cli(*args, "--", "corral", "pipeline", "run", str(spec), env=env, check=False, timeout=1800)


def pretrain_steps(client) -> list[int]:
    exp = client.get_experiment_by_name("e2e-tiny")
    runs = client.search_runs([exp.experiment_id], "tags.`corral.step` = 'pretrain'") if exp else []
    return sorted({m.step for r in runs[:1] for m in client.get_metric_history(r.info.run_id, "loss")})


def test_submit_stop_resubmit_and_load_the_registered_models(stack, tmp_path, monkeypatch):
    spec = short_spec(tmp_path)
    # the registry (and models:/ URIs) follow the process-wide URI, not MlflowClient's argument
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient(stack["MLFLOW_TRACKING_URI"], registry_uri=stack["MLFLOW_TRACKING_URI"])

    r = submit(stack, spec, wait=False)
    assert r.returncode == 0, r.stdout + r.stderr
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", r.stdout + r.stderr).group(0)
    deadline = time.time() + 900
    state = json.loads((Path(stack["CORRAL_HOME"]) / "stack.json").read_text())
    while len(pretrain_steps(client)) < 12:  # past the step-10 checkpoint
        assert time.time() < deadline, cli("ray", "job", "logs", job_id, env=stack, check=False).stdout[-5000:]
        SOCKETS_SEEN.update(stack_sockets(state))  # the job driver, step tasks and training workers
        time.sleep(5)
    cli("ray", "job", "stop", job_id, env=stack)
    status = cli("ray", "job", "status", job_id, env=stack)
    assert "stopped" in (status.stdout + status.stderr).lower()
    for _ in range(24):  # Ray reaps the stopped job's actors within seconds (a loaded host: longer)
        actors = cli("ray", "list", "actors", "--filter", "state=ALIVE", "--address",
                     stack["RAY_API_SERVER_ADDRESS"], env=stack, check=False)
        if actors.returncode == 0 and "RayTrainWorker" not in actors.stdout and "TrainController" not in actors.stdout:
            break
        time.sleep(5)
    else:
        pytest.fail(f"trainer actors left behind after `ray job stop`:\n{actors.stdout}{actors.stderr}")
    parents = client.search_runs([client.get_experiment_by_name("e2e-tiny").experiment_id],
                                 "tags.`corral.pipeline` = 'e2e-tiny'")
    assert [p.info.status for p in parents] == ["KILLED"]  # the runner unwound on SIGTERM

    r = submit(stack, spec)
    assert r.returncode == 0 and "succeeded" in r.stdout, r.stdout[-6000:] + r.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines() if "http://" in line and len(line.split()) >= 4}
    assert rows["tokenizer"] == rows["data"] == "reused"
    assert rows["pretrain"] == rows["sft"] == rows["register"] == "succeeded"
    assert pretrain_steps(client) == list(range(1, 41))  # resumed: every step once in one MLflow run

    for name in ("e2e-base", "e2e-chat"):
        version = client.get_model_version_by_alias(name, "candidate")
        local = mlflow.artifacts.download_artifacts(f"models:/{name}@candidate", dst_path=str(tmp_path / name),
                                                    tracking_uri=stack["MLFLOW_TRACKING_URI"])
        model = corral.load_model(local)
        assert model.config.num_params() == corral.ModelConfig.preset("tiny").num_params(), version
        assert (Path(local) / "hf" / "config.json").is_file()  # the Hugging Face export travels with it


def test_a_stopped_job_gets_time_to_unwind(stack, tmp_path):
    """`ray job stop` sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (Ray's default: 3 s).
    `corral up` gives a job 30 s: time for the pipeline runner to mark its MLflow runs KILLED on a
    loaded machine. This job takes 6 s to unwind."""
    mark = tmp_path / "unwound"
    script = tmp_path / "slow_unwind.py"
    script.write_text(
        "import pathlib, signal, sys, time\n"
        "def stop(*_):\n"
        "    time.sleep(6)\n"
        f"    pathlib.Path({str(mark)!r}).write_text('unwound')\n"
        "    sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        f"pathlib.Path({str(mark)!r} + '.started').touch()\n"
        "time.sleep(600)\n")
    r = cli("ray", "job", "submit", "--no-wait", "--", sys.executable, script, env=stack)
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", r.stdout + r.stderr).group(0)
    deadline = time.time() + 300
    while not Path(f"{mark}.started").exists():
        assert time.time() < deadline, cli("ray", "job", "logs", job_id, env=stack, check=False).stdout[-3000:]
        time.sleep(1)
    cli("ray", "job", "stop", job_id, env=stack)
    assert mark.is_file() and mark.read_text() == "unwound"


def allowed_beyond_loopback() -> dict[str, tuple[str, str]]:
    """docs/security.md's table of sockets beyond loopback: {command prefix: (why, protection)}."""
    text = (REPO / "docs/security.md").read_text()
    section = text.split("### Listening beyond loopback", 1)[1].split("\n#", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| `")]
    allowed = {row[0].strip("`"): (row[2], row[3]) for row in rows}
    assert all(why and protection for why, protection in allowed.values()), "each entry needs why and protection"
    return allowed


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def test_the_stack_listens_on_loopback_only(stack):
    """Every listening socket of `corral up`'s processes, now and while the pipeline trained, is on
    loopback, or named in docs/security.md with its reason and protection."""
    state = json.loads((Path(stack["CORRAL_HOME"]) / "stack.json").read_text())
    seen = SOCKETS_SEEN | stack_sockets(state)
    ports = {port for _, port, _ in seen}
    assert int(stack["RAY_ADDRESS"].rsplit(":", 1)[1]) in ports and state["mlflow_port"] in ports, seen
    allowed = allowed_beyond_loopback()
    beyond = sorted(s for s in seen if not is_loopback(s[0]) and not any(s[2].startswith(p) for p in allowed))
    assert not beyond, (f"listening beyond loopback: {beyond}; bind them to 127.0.0.1, or name them in "
                        f"docs/security.md with why and how they are protected")
    print("\nlistening sockets of the stack: " + ", ".join(f"{a}:{p} {c}" for a, p, c in sorted(seen)))
