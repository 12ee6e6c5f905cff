"""`make demo`: the README's own commands, run in order as a user would type them.

The README marks each runnable shell block with `<!-- corral:NAME -->` on the line before it:
up -> submit -> status -> serve -> request -> down. The demo runs every block but `down` (it
leaves the stack running to look at), then prints where everything is. tests/e2e runs the same
blocks, so the README cannot drift from what works.

Ports: CORRAL_RAY_PORT, CORRAL_DASHBOARD_PORT, CORRAL_MLFLOW_PORT, CORRAL_AGENT_PORT (defaults
6379, 8265, 5000, 52365) and CORRAL_SERVE_PORT (8000).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"^<!-- corral:(?P<name>[\w-]+) -->\n```bash\n(?P<script>.*?)^```$", re.S | re.M)
FLOW = ("up", "submit", "status", "serve", "request", "down")
# what a shell sets for itself: not carried from one block to the next
SHELL_VARS = {"_", "SHLVL", "PWD", "OLDPWD"}


def readme_blocks(readme: Path = REPO / "README.md") -> dict[str, str]:
    """The README's marked shell blocks, by name, exactly as written."""
    blocks = {m["name"]: m["script"] for m in BLOCK.finditer(readme.read_text())}
    if missing := [name for name in FLOW if name not in blocks]:
        raise ValueError(f"{readme}: no `<!-- corral:NAME -->` block for {missing}")
    return blocks


def run_block(script: str, env: dict[str, str], cwd: Path, capture: bool = False,
              timeout: float | None = None) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    """Run one block in bash (stopping at its first failing command) and return the environment
    it leaves, so that what one block exports (`eval "$(corral env)"`) reaches the next."""
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "env"
        done = subprocess.run(["bash", "-e", "-c", f"{script}\nenv -0 > '{dump}'\n"], env=env, cwd=cwd, text=True,
                              capture_output=capture, timeout=timeout)
        if done.returncode or not dump.is_file():
            return done, env
        pairs = (kv.split("=", 1) for kv in dump.read_text().split("\0") if "=" in kv)
        return done, {k: v for k, v in pairs if k not in SHELL_VARS}


def main() -> None:
    start = time.time()
    blocks = readme_blocks()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for name in FLOW[:-1]:
        print(f"\n==> README block `{name}`\n{blocks[name]}", flush=True)
        done, env = run_block(blocks[name], env, REPO)
        if done.returncode:
            raise SystemExit(f"demo: the README's `{name}` block failed with exit code {done.returncode}")
    os.environ.update(env)
    print_eval_table()
    port = env.get("CORRAL_SERVE_PORT", "8000")
    print(f"\nchat endpoint: http://127.0.0.1:{port}/v1/chat/completions (model corral-chat)")
    print(f"MLflow UI:     {env['MLFLOW_TRACKING_URI']}    Ray dashboard: {env['RAY_DASHBOARD_ADDRESS']}")
    print("stop it all:   corral down")
    print(f"demo finished in {(time.time() - start) / 60:.1f} minutes")


def print_eval_table() -> None:
    """The evaluate step's Markdown table from the latest pipeline run, if the spec has one."""
    from corral import tracking

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
