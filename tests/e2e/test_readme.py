"""The README's "Using it" blocks, run verbatim on a fresh copy of the checkout, as a new user would:
up -> submit -> status -> serve -> request -> down (`corral.demo.readme_blocks`, which `make demo`
runs too). The only differences from a user's terminal: free ports through the CORRAL_*_PORT
variables, and a HOME without Ray's ~/.ray/auth_token (a fresh machine's).

After the flow, with the stack still up: re-submitting the same command reuses every step, the
registered models load back, and a stopped job gets time to unwind. `corral down` (the README's
last block) must leave no Ray or MLflow process behind.

Runs before the rest of the suite's Ray cluster exists (tests/e2e sorts first) and uses its own
ports, so it never shares a Ray head with other tests."""

import contextlib
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import psutil
import pytest

import corral
from corral.demo import FLOW, readme_blocks, run_block
from tests.conftest import free_port

# the whole tiny spec runs in the first test: 9-12 min here on a quiet day, twice that on a busy one
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2700)]
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# what a new user's shell does not have: whatever points at another cluster or home
FOREIGN = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_DASHBOARD_ADDRESS", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI",
           "CORRAL_HOME", "CORRAL_EXPERIMENT")
# a fresh checkout holds none of these
STEP_STATUSES = {"succeeded", "reused", "failed", "skipped", "killed", "running", "pending"}
NOT_CHECKED_OUT = shutil.ignore_patterns(".git", ".venv", ".corral", "__pycache__", "*.egg-info", ".pytest_cache",
                                         "mlruns", "build")


class Flow:
    """One shell session through the README's blocks, in a copy of the checkout."""

    def __init__(self, checkout: Path, env: dict[str, str]):
        self.checkout, self.env, self.blocks, self.out = checkout, env, readme_blocks(checkout / "README.md"), {}

    def run(self, name: str, timeout: float = 900) -> str:
        start = time.time()
        try:
            done, env = run_block(self.blocks[name], self.env, self.checkout, capture=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"README block `{name}` ran past {timeout:.0f}s:\n{(e.stdout or '')[-6000:]}")
        output = done.stdout + done.stderr
        print(f"README block `{name}`: {time.time() - start:.0f}s")
        assert done.returncode == 0, f"README block `{name}` failed ({done.returncode}):\n{output[-8000:]}"
        self.env, self.out[name] = env, output
        return output


@pytest.fixture(scope="module")
def flow():
    # not under pytest's basetemp: other pytest sessions on this host prune old numbered basetemps,
    # and a ~15 min session loses its checkout (and the stack's MLflow database) under it
    root = Path(tempfile.mkdtemp(prefix="corral-readme-"))
    checkout, home = root / "corral", root / "home"
    shutil.copytree(REPO, checkout, ignore=NOT_CHECKED_OUT)
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN} | {
        "HOME": str(home),  # a fresh machine's, without the ~/.ray/auth_token that Ray's token auth needs
        # but pip's configuration and caches (the demo corpus, DeepSpeed's compiled ops) from this one
        "XDG_CONFIG_HOME": os.environ.get("XDG_CONFIG_HOME", str(Path.home() / ".config")),
        "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # `source .venv/bin/activate`
        **{f"CORRAL_{name}_PORT": str(free_port()) for name in ("RAY", "DASHBOARD", "MLFLOW", "AGENT", "SERVE")},
    }
    f = Flow(checkout, env)
    try:
        f.run("up", timeout=600)
        yield f
    finally:  # `corral down` also when a block failed, so that nothing outlives the test
        state_file = checkout / ".corral" / "stack.json"
        state = json.loads(state_file.read_text()) if state_file.is_file() else None
        f.run("down", timeout=300)
        shutil.rmtree(root, ignore_errors=True)
    leftovers = [" ".join(p.cmdline())[:80] for p in head_processes(state)]
    assert not leftovers, f"corral down left {len(leftovers)} Ray processes: {leftovers}"
    assert not psutil.pid_exists(state["mlflow_pid"]) or psutil.Process(state["mlflow_pid"]).status() == "zombie", \
        "corral down left the MLflow server running"


def head_processes(state: dict) -> list[psutil.Process]:
    def ours(p):
        with contextlib.suppress(psutil.Error):
            return os.getpgid(p.pid) == state["ray_pgid"] or any(state["ray_session"] in a for a in p.cmdline())
    return [p for p in psutil.process_iter() if ours(p)]


def step_rows(output: str) -> dict[str, str]:
    """`step -> status` from the summary table a pipeline run prints."""
    rows = (line.split() for line in output.splitlines() if "http://" in line)
    return {row[0]: row[1] for row in rows if len(row) >= 4 and row[1] in STEP_STATUSES}


def test_the_readme_flow_runs_verbatim(flow):
    assert FLOW == ("up", "submit", "status", "serve", "request", "down")
    home = flow.checkout / ".corral"
    assert (Path(flow.env["HOME"]) / ".ray" / "auth_token").is_file()  # made by `corral up`
    state = json.loads((home / "stack.json").read_text())
    # the agents rename themselves ("ray::DashboardAgent"): only their process group says whose they are
    assert {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= {p.name() for p in head_processes(state)}
    server = psutil.Process(state["mlflow_pid"])  # without MLflow's job runner: its consumers poll all day
    assert not [p for p in server.children(recursive=True) if "mlflow.server.jobs" in " ".join(p.cmdline())]
    assert any((home / "data" / "gutenberg").glob("*.txt"))

    rows = step_rows(flow.run("submit", timeout=2400))
    assert rows and set(rows.values()) == {"succeeded"}, flow.out["submit"][-6000:]
    assert {"tokenizer", "pretrain", "sft", "ppo", "register"} <= set(rows)
    # `${CORRAL_HOME}` meant the submitter's home, not the job's uploaded copy of the checkout
    assert any((home / "pipelines").iterdir())

    status = flow.run("status", timeout=300)
    assert "llama2-tiny" in status and "register" in status and "succeeded" in status

    flow.run("serve", timeout=900)
    reply = flow.run("request", timeout=300).strip()
    assert reply, "the chat model answered nothing"


def test_resubmitting_reuses_every_step(flow):
    rows = step_rows(flow.run("submit", timeout=900))
    assert rows and set(rows.values()) == {"reused"}, flow.out["submit"][-6000:]


def test_the_registered_models_load_back(flow, tmp_path, monkeypatch):
    uri = flow.env["MLFLOW_TRACKING_URI"]
    # the registry (and models:/ URIs) follow the process-wide URI, not MlflowClient's argument
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name in ("llama2-tiny-base", "llama2-tiny-chat", "llama2-tiny-guard"):
        local = mlflow.artifacts.download_artifacts(f"models:/{name}@candidate", dst_path=str(tmp_path / name),
                                                    tracking_uri=uri)
        model = corral.load_model(local)
        assert model.config.num_params() == corral.ModelConfig.preset("tiny").num_params()
        assert (Path(local) / "config.json").is_file()  # the checkpoint is a Hugging Face directory too


def test_a_stopped_job_gets_time_to_unwind(flow, tmp_path):
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

    def ray(*args):
        r = subprocess.run([str(BIN / "ray"), *map(str, args)], capture_output=True, text=True, env=flow.env,
                           cwd=flow.checkout, timeout=300)
        assert r.returncode == 0, f"ray {args}: {r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r.stdout + r.stderr

    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", ray("job", "submit", "--no-wait", "--", sys.executable, script))[0]
    deadline = time.time() + 300
    while not Path(f"{mark}.started").exists():
        assert time.time() < deadline, ray("job", "logs", job_id)[-3000:]
        time.sleep(1)
    ray("job", "stop", job_id)
    assert mark.is_file() and mark.read_text() == "unwound"


def stack_sockets(state: dict) -> set[tuple[str, int, str]]:
    """(address, port, command) of every listening socket of the stack's processes: the Ray head's
    (its process group or session, and all they started: workers, Serve, job drivers) and MLflow's."""
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


def test_the_stack_listens_on_loopback_only(flow):
    """Every listening socket of the stack's processes (Ray, MLflow, Serve after the flow) is on
    loopback, or named in docs/security.md with its reason and protection."""
    state = json.loads((flow.checkout / ".corral" / "stack.json").read_text())
    seen = stack_sockets(state)
    ports = {port for _, port, _ in seen}
    assert int(flow.env["CORRAL_RAY_PORT"]) in ports and state["mlflow_port"] in ports, seen
    allowed = allowed_beyond_loopback()
    beyond = sorted(s for s in seen if not is_loopback(s[0]) and not any(s[2].startswith(p) for p in allowed))
    assert not beyond, (f"listening beyond loopback: {beyond}; bind them to 127.0.0.1, or name them in "
                        f"docs/security.md with why and how they are protected")
