"""The README's runnable blocks, as `make demo` and tests/e2e read them, without a cluster: every block
of the flow is there, what they name exists, and one block's exports reach the next. `corral env`
and `corral up`'s port variables, which the blocks rely on."""

import json
import os
from dataclasses import asdict

import yaml
from ray.serve.schema import ServeDeploySchema

from corral import cli, stack
from corral.demo import FLOW, readme_blocks, run_block
from pipelines.spec import load_spec
from tests.conftest import REPO


def test_the_readme_has_every_block_of_the_flow_and_what_they_name_exists():
    blocks = readme_blocks()
    assert set(FLOW) <= set(blocks) and all(blocks[name].strip() for name in FLOW)
    spec = blocks["submit"].split("corral pipeline run ")[1].split()[0]
    assert load_spec(REPO / spec).name == "llama2-tiny"
    config = blocks["serve"].split("serve deploy ")[1].split()[0]
    (app,) = ServeDeploySchema.model_validate(yaml.safe_load((REPO / config).read_text())).applications
    assert app.args["chat"]["model"] == "models:/llama2-tiny-chat@candidate"  # what the spec registers
    assert app.args["guard"]["model"] == "models:/llama2-tiny-guard@candidate"
    assert {m["name"] for m in load_spec(REPO / spec).steps["register"].config["models"]} >= {
        "llama2-tiny-base", "llama2-tiny-chat", "llama2-tiny-guard"}


def test_a_block_s_exports_reach_the_next_and_a_failing_block_stops(tmp_path):
    env = {"PATH": os.environ["PATH"]}
    done, env = run_block("export CORRAL_X=1\ncd /", env, tmp_path, capture=True)
    assert done.returncode == 0 and env["CORRAL_X"] == "1" and "PWD" not in env
    done, after = run_block("false\nexport CORRAL_Y=2", env, tmp_path, capture=True)
    assert done.returncode != 0 and after == env


def test_corral_env_prints_the_recorded_stack_and_up_reads_port_variables(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))
    assert cli.main(["env"]) == 2 and "corral up" in capsys.readouterr().err
    (tmp_path / "stack.json").write_text(json.dumps(asdict(stack.Stack(ray_port=16379, dashboard_port=18265))))
    assert cli.main(["env"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("export ") and "RAY_ADDRESS=127.0.0.1:16379" in line
    assert "RAY_DASHBOARD_ADDRESS=http://127.0.0.1:18265" in line and "RAY_AUTH_MODE=token" in line
    monkeypatch.setenv("CORRAL_MLFLOW_PORT", "15000")
    args = cli.build_parser().parse_args(["up"])
    assert (args.mlflow_port, args.ray_port) == (15000, 6379)
