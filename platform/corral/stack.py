"""The local stack: a Ray head and an MLflow tracking server, started and stopped as one.

`corral up` starts what is not already running, waits until it answers, and records what it
started in `$CORRAL_HOME/stack.json`; `corral down` stops exactly that. Everything else in corral
reaches the stack through the usual variables (RAY_ADDRESS, RAY_API_SERVER_ADDRESS,
MLFLOW_TRACKING_URI), so the same commands run against a real cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path


def corral_home() -> Path:
    """Where the local stack keeps its state, logs, MLflow database and artifacts."""
    return Path(os.environ.get("CORRAL_HOME", ".corral")).resolve()


@dataclass
class Stack:
    ray_port: int = 6379
    dashboard_port: int = 8265
    mlflow_port: int = 5000
    agent_port: int = 52365  # the dashboard agent serves job submission; two clusters on one host need two
    ray_started: bool = False  # False when a Ray head was already running: `down` leaves it alone
    ray_session: str | None = None  # /tmp/ray/session_...: named by the head's main processes
    ray_pgid: int | None = None  # the process group of everything `ray start` left running (agents included)
    mlflow_pid: int | None = None

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        """The environment a user exports to reach this stack (Ray 2.60 turns on token auth)."""
        return {
            "RAY_ADDRESS": f"127.0.0.1:{self.ray_port}",
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,  # `ray job submit`
            "RAY_DASHBOARD_ADDRESS": self.dashboard_url,  # `serve deploy`, `serve status`
            "RAY_AUTH_MODE": "token",
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            # a driver (`serve start`, ray.init) must also see itself at 127.0.0.1, the head's node
            # address (LOOPBACK_ONLY), or it waits forever for a node at the host's network address
            **LOOPBACK_ONLY,
        }


def _state_file() -> Path:
    return corral_home() / "stack.json"


def load_state() -> Stack | None:
    f = _state_file()
    return Stack(**json.loads(f.read_text())) if f.is_file() else None


def _save_state(stack: Stack) -> None:
    f = _state_file()
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(stack), indent=2))
    os.replace(tmp, f)


def _answers(url: str) -> bool:
    """True if an HTTP server answers at url (an auth error is an answer too)."""
    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _wait_for(url: str, what: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout
    while not _answers(url):
        if (proc is not None and proc.poll() is not None) or time.time() > deadline:
            hint = f"; see {log}" if log else ""
            raise RuntimeError(f"{what} did not answer at {url} within {timeout:.0f}s{hint}")
        time.sleep(0.5)


def _ray_bin() -> str:
    return shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


# Ray starts its workers at nice 15, so that the raylet and GCS win the CPU under load. On a 2-core
# machine that costs training: each wake-up of a daemon preempts one of torch's two threads and
# the other waits for it. The tiny SFT step ran 10-25 % faster in a Ray Train worker at nice 0
# (pipeline runs: 162 ms/step at 15, 145-154 at 0; the bare step in a worker: 143-157 vs 115-125).
WORKER_PRIORITY = {"RAY_worker_niceness": "0"}
# `ray job stop` sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (Ray's default: 3 s).
# The pipeline runner spends that time cancelling its steps and marking their MLflow runs KILLED;
# on a loaded 2-core machine that took longer than 3 s, and the runs were left RUNNING.
JOB_STOP_GRACE = {"RAY_JOB_STOP_WAIT_TIME_S": "30"}
# The local stack keeps to loopback. `ray start --node-ip-address 127.0.0.1` alone does not: Ray
# swaps a loopback address for the host's network address, so GCS, the raylet, the agents, the
# client server and the metrics ports listened on every interface. With clusters turned off (what
# Ray does on macOS and Windows) the node's address is 127.0.0.1 and they all bind to it; only a
# second node cannot join, which a one-host stack never needs. See docs/security.md.
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


# MLflow 3's server also starts a job runner and seven huey consumer processes, for GenAI scorer
# jobs that corral does not run; each polls its queue. On 2 cores they slowed a Ray Train loop on
# the same stack ~15 % (the tiny SFT step: 254-277 ms with them, 218-220 ms without).
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def start_mlflow_server(port: int, db: Path, artifacts: Path, log, **popen_kwargs) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:`port`, SQLite `db`, artifacts served from `artifacts`."""
    return subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", str(artifacts),
         "--serve-artifacts", "--workers", "1"],
        env=os.environ | MLFLOW_SERVER_ENV, stdout=log, stderr=subprocess.STDOUT, **popen_kwargs,
    )


def up(ray_port: int = 6379, dashboard_port: int = 8265, mlflow_port: int = 5000, agent_port: int = 52365,
       num_cpus: int | None = None, log=print) -> Stack:
    """Start Ray and MLflow unless they already answer; return the stack and record it."""
    home = corral_home()
    (home / "logs").mkdir(parents=True, exist_ok=True)
    stack = load_state() or Stack(ray_port, dashboard_port, mlflow_port, agent_port)

    if _answers(stack.mlflow_uri + "/health"):
        log(f"MLflow already running at {stack.mlflow_uri}")
    else:
        mlflow_log = home / "logs" / "mlflow.log"
        proc = start_mlflow_server(stack.mlflow_port, home / "mlflow.db", home / "mlartifacts", open(mlflow_log, "a"),
                                   start_new_session=True)
        stack.mlflow_pid = proc.pid
        _save_state(stack)
        log(f"starting MLflow on {stack.mlflow_uri} (log: {mlflow_log})")
        _wait_for(stack.mlflow_uri + "/health", "MLflow", 300, proc, mlflow_log)

    if _answers(stack.dashboard_url + "/api/version"):
        log(f"Ray already running (dashboard {stack.dashboard_url})")
    else:
        cmd = [_ray_bin(), "start", "--head", "--port", str(stack.ray_port), "--dashboard-host", "127.0.0.1",
               "--dashboard-port", str(stack.dashboard_port), "--dashboard-agent-listen-port", str(stack.agent_port),
               "--disable-usage-stats", "--node-ip-address", "127.0.0.1"]
        # Logical CPUs, not cores: training workers hold theirs for the whole run while Ray Data
        # read tasks and step tasks need more; on a laptop they mostly wait on each other, and
        # too few logical CPUs deadlocks a training step behind its own data loading.
        cmd += ["--num-cpus", str(num_cpus or max(8, os.cpu_count() or 1))]
        log("starting Ray head: " + " ".join(cmd[1:]))
        env = {**os.environ, "MLFLOW_TRACKING_URI": stack.mlflow_uri, "RAY_AUTH_MODE": "token",
               **WORKER_PRIORITY, **JOB_STOP_GRACE, **LOOPBACK_ONLY,
               # job entrypoints (`corral pipeline run ...`) find this environment's commands
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        # A job runs in Ray's uploaded copy of the working directory, where the git-ignored .corral/
        # is absent: with the absolute home here, `${CORRAL_HOME}` in a spec means the submitter's.
        env["CORRAL_HOME"] = str(home)
        ray_log = home / "logs" / "ray-start.log"
        with open(ray_log, "a") as out:
            # A fresh machine has no token yet: `ray start` would refuse to start. This makes
            # ~/.ray/auth_token once (or keeps RAY_AUTH_TOKEN / the existing file) and prints nothing.
            if subprocess.run([_ray_bin(), "get-auth-token", "--generate"], env=env, stdout=subprocess.DEVNULL,
                              stderr=out).returncode:
                raise RuntimeError(f"`ray get-auth-token --generate` failed; see {ray_log}")
            # its own process group: the dashboard and runtime-env agents and the client server
            # rename themselves ("ray::DashboardAgent") and name no session for `down` to find
            start = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            if start.wait():
                raise RuntimeError(f"`ray start` failed; see {ray_log}")
        stack.ray_started, stack.ray_session, stack.ray_pgid = True, _ray_session(stack.ray_port), start.pid
        _save_state(stack)
        _wait_for(stack.dashboard_url + "/api/version", "Ray dashboard", 300, log=ray_log)
        # `ray job submit` goes through the dashboard agent, which starts after the dashboard:
        # until it answers, submissions fail with "No available agent".
        _wait_for(f"http://127.0.0.1:{stack.agent_port}/api/job_agent/jobs/none/logs", "Ray job agent", 300,
                  log=ray_log)
    _save_state(stack)
    return stack


def _ray_session(gcs_port: int) -> str | None:
    """The session directory of the Ray head whose GCS listens on gcs_port."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if any(a == f"--gcs_server_port={gcs_port}" for a in cmd):
            for a in cmd:
                if a.startswith("--log_dir="):
                    return str(Path(a.split("=", 1)[1]).parent)
    return None


def ray_processes(stack: Stack) -> list:
    """Every process of the Ray head `up` started: its process group, or naming its session."""
    import psutil

    return [p for p in psutil.process_iter(["cmdline"]) if p.pid != os.getpid()
            and (_same_group(p, stack.ray_pgid) or any(stack.ray_session in a for a in (p.info["cmdline"] or [])))]


def _same_group(proc, pgid: int | None) -> bool:
    try:
        return pgid is not None and os.getpgid(proc.pid) == pgid
    except OSError:
        return False


def _stop(procs: list) -> int:
    """SIGTERM, then SIGKILL after 15 s (a loaded host can take that long to shut uvicorn down).
    `ray stop` would stop every Ray instance on the machine, including ones corral did not start."""
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=15)
    return len(procs)


def down(log=print) -> None:
    """Stop what `up` started, and nothing else."""
    stack = load_state()
    if stack is None:
        log("nothing to stop: corral up has not run here")
        return
    if stack.ray_started and stack.ray_session:
        log(f"stopped Ray ({_stop(ray_processes(stack))} processes of {stack.ray_session})")
    if _pid_alive(stack.mlflow_pid):
        import psutil

        _stop([p for p in psutil.process_iter() if _same_group(p, stack.mlflow_pid)])  # server + uvicorn workers
        log("stopped MLflow")
    _state_file().unlink()


def status() -> dict:
    stack = load_state() or Stack()
    return {
        "ray": {"dashboard": stack.dashboard_url, "up": _answers(stack.dashboard_url + "/api/version"),
                "started_by_corral": stack.ray_started},
        "mlflow": {"uri": stack.mlflow_uri, "up": _answers(stack.mlflow_uri + "/health"), "pid": stack.mlflow_pid},
        "home": str(corral_home()),
    }
