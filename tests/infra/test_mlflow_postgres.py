"""MLflow on a real PostgreSQL, the backend store the compose file uses: Debian's server, started
here for the test (installed with apt-get when missing), an `mlflow server` on it, a run logged
and read back, a model version registered with an alias. As in the compose file, the database
asks for a password and the server gets it from the environment, not its command line."""

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import psutil
import pytest

from tests.conftest import free_port, stop_process


PASSWORD = "pg-test-secret-4f1c9a"


def pg_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"],
                       check=False, capture_output=True, timeout=600,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else None


@pytest.fixture(scope="module")
def postgres():
    bindir = pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed and cannot be installed here (needs root and apt-get)")
    home = Path(tempfile.mkdtemp(prefix="corral-pg-"))  # not under pytest's root-only tmp: postgres reads it
    data, port = home / "data", free_port()
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses root
    if as_pg:
        shutil.chown(home, "postgres")
    (home / "pw").write_text(PASSWORD)
    if as_pg:
        shutil.chown(home / "pw", "postgres")
    subprocess.run(as_pg + [f"{bindir}/initdb", "-D", str(data), "-U", "mlflow", "--auth-local=trust",
                            "--auth-host=scram-sha-256", f"--pwfile={home / 'pw'}"], check=True, capture_output=True)
    subprocess.run(as_pg + [f"{bindir}/pg_ctl", "-D", str(data), "-l", str(home / "pg.log"), "-w", "start",
                            "-o", f"-p {port} -k {home} -c listen_addresses=127.0.0.1"], check=True, capture_output=True)
    yield f"postgresql://mlflow@127.0.0.1:{port}/postgres"
    subprocess.run(as_pg + [f"{bindir}/pg_ctl", "-D", str(data), "-m", "fast", "stop"], capture_output=True)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_on_postgres(postgres, tmp_path_factory):
    port, home = free_port(), tmp_path_factory.mktemp("mlflow-pg")
    # the compose file's way: the store URI names no password, libpq reads PGPASSWORD
    env = os.environ | {"MLFLOW_BACKEND_STORE_URI": postgres, "PGPASSWORD": PASSWORD}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--artifacts-destination", str(home / "artifacts"), "--serve-artifacts", "--workers", "1"],
                            stdout=open(home / "log", "w"), stderr=subprocess.STDOUT, env=env)
    uri, deadline = f"http://127.0.0.1:{port}", time.time() + 180
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, (home / "log").read_text()[-3000:]
            time.sleep(0.5)
    yield uri, proc
    stop_process(proc)


def test_the_database_wants_a_password_which_no_command_line_shows(postgres, mlflow_on_postgres):
    import psycopg

    with pytest.raises(psycopg.OperationalError, match="password"):  # this process has no PGPASSWORD
        psycopg.connect(postgres, connect_timeout=10).close()
    _, proc = mlflow_on_postgres
    server = psutil.Process(proc.pid)
    for p in [server, *server.children(recursive=True)]:
        assert PASSWORD not in " ".join(p.cmdline()), p.cmdline()


def test_mlflow_server_on_postgres_logs_and_reads_back(mlflow_on_postgres, tmp_path):
    client = mlflow.MlflowClient(mlflow_on_postgres[0])
    exp = client.create_experiment("pg-check")
    run = client.create_run(exp, run_name="pg")
    client.log_param(run.info.run_id, "backend", "postgresql")
    for step, loss in enumerate([3.0, 2.5, 2.1]):
        client.log_metric(run.info.run_id, "loss", loss, step=step)
    (tmp_path / "note.txt").write_text("artifact through the server")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    client.set_terminated(run.info.run_id)

    again = client.get_run(run.info.run_id)
    assert again.data.params == {"backend": "postgresql"} and again.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [3.0, 2.5, 2.1]
    local = client.download_artifacts(run.info.run_id, "note.txt", str(tmp_path / "dl"))
    assert open(local).read() == "artifact through the server"

    client.create_registered_model("pg-model")
    version = client.create_model_version("pg-model", f"{again.info.artifact_uri}/note.txt", run.info.run_id)
    client.set_registered_model_alias("pg-model", "champion", version.version)
    assert client.get_model_version_by_alias("pg-model", "champion").run_id == run.info.run_id
