"""Pipeline specs: every shipped spec parses, and bad specs report every problem at once."""

from pathlib import Path

import pytest

from pipelines.spec import SpecError, apply_overrides, load_spec, validate_spec

SPECS = sorted((Path(__file__).resolve().parents[2] / "pipelines/specs").glob("*.yaml"))


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_every_shipped_spec_validates(path):
    spec = load_spec(path)
    assert spec.order()[0] == "tokenizer"
    for sid in spec.steps:
        spec.step_config(sid)


def test_big_presets_carry_the_paper_recipe():
    for size, lr in [("7b", 3e-4), ("13b", 3e-4), ("70b", 1.5e-4)]:
        spec = load_spec(SPECS[0].parent / f"llama2-{size}.yaml")
        cfg = spec.step_config("pretrain")
        assert cfg.model_config_resolved().max_seq_len == 4096
        assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio) == (lr, 2000, 0.1)
        assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps, cfg.optim.weight_decay) == (0.9, 0.95, 1e-5, 0.1)
        assert cfg.deepspeed.grad_clip == 1.0 and cfg.deepspeed.zero_stage == 3
        r = cfg.resources
        assert r.num_workers * cfg.loop.micro_batch_size * cfg.deepspeed.grad_accum_steps == 1024  # 4M tokens


def base_spec():
    return {"name": "t", "steps": {
        "tok": {"uses": "tokenizer", "config": {"inputs": ["x.txt"], "vocab_size": 500}},
        "data": {"uses": "prepare_data", "needs": ["tok"], "config": {"inputs": ["x.txt"]}},
        "train": {"uses": "pretrain", "needs": ["data"], "resources": {"num_workers": 2}},
    }}


def test_all_problems_are_reported_at_once_with_step_and_field():
    raw = apply_overrides(base_spec(), [
        "steps.tok.config.vocab_size=10",
        "steps.data.needs=[tok, ghost]",
        "steps.train.config.loop.max_steps=-1",
        "steps.train.resources.gpus_per_worker=-2",
        "steps.extra.uses=finetune_everything",
        "steps.train.config.optim.betas=[0.9, 0.95]",
    ])
    with pytest.raises(SpecError) as e:
        validate_spec(raw, "t.yaml")
    locs = {loc for loc, _ in e.value.problems}
    assert locs == {"steps.tok.config.vocab_size", "steps.data.needs", "steps.train.config.loop.max_steps",
                    "steps.train.resources.gpus_per_worker", "steps.extra.uses", "steps.train.config.optim.betas"}
    assert "t.yaml: 6 problem(s)" in str(e.value)
    assert "ghost" in str(e.value) and "finetune_everything" in str(e.value)


def test_cycles_are_named():
    raw = apply_overrides(base_spec(), ["steps.tok.needs=[train]"])
    with pytest.raises(SpecError, match="cycle: .*tok.*train"):
        validate_spec(raw)


def test_requests_no_node_can_hold_are_reported():
    raw = apply_overrides(base_spec(), ["steps.train.resources.gpus_per_worker=1",
                                        "steps.train.resources.accelerator_type=H100"])
    nodes = [{"CPU": 2.0}, {"CPU": 96.0, "GPU": 8.0, "accelerator_type:A100": 1.0}]
    with pytest.raises(SpecError, match="steps.train.resources: no node .* H100"):
        validate_spec(raw, cluster_nodes=nodes)
    nodes.append({"CPU": 192.0, "GPU": 8.0, "accelerator_type:H100": 1.0})
    assert validate_spec(raw, cluster_nodes=nodes)


def test_overrides_parse_yaml_scalars_and_reject_garbage():
    raw = apply_overrides(base_spec(), ["steps.train.config.loop.max_steps=10", "steps.train.config.deepspeed.bf16=false"])
    cfg = validate_spec(raw).step_config("train")
    assert cfg.loop.max_steps == 10 and cfg.deepspeed.bf16 is False
    with pytest.raises(ValueError, match="KEY=VALUE"):
        apply_overrides(base_spec(), ["steps.train"])


def test_defaults_and_resources_flow_into_step_configs():
    raw = base_spec() | {"defaults": {"model": "small"}, "tracking": {"experiment": "exp1"}}
    cfg = validate_spec(raw).step_config("train")
    assert cfg.model == "small" and cfg.resources.num_workers == 2 and cfg.tracking.experiment == "exp1"


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_spec(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="yaml"):
        load_spec(tmp_path / "bad.yaml")


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_every_shipped_spec_dry_runs(path, mlflow_server):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-m", "corral.cli", "pipeline", "run", str(path), "--dry-run"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    plan_rows = [line.split() for line in r.stdout.splitlines()[1:] if line and not line.startswith("(")]
    spec = load_spec(path)
    assert [row[0] for row in plan_rows] == spec.order()
    assert all(row[-1] == "run" for row in plan_rows)  # nothing of these specs ran on this server
