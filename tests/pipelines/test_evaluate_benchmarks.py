"""The evaluate step runs lm-eval tasks from its config and records them in MLflow (a real
server), next to the task-suite metrics, where the register step's gates can name them."""

from __future__ import annotations

import json

import pytest

import corral
from corral.config import Gate, ModelConfig
from corral.model import Transformer
from pipelines.spec import load_spec
from tests.conftest import REPO


def test_the_evaluate_step_logs_lm_eval_metrics_to_mlflow(mlflow_server, tokenizer, tmp_path):
    import mlflow

    from pipelines.steps import evaluate, register

    model = corral.save_model(Transformer(ModelConfig.preset("tiny")).init_weights(seed=3), tmp_path / "m", tokenizer)
    config = {"tasks": {"eval_size": 2}, "max_tokens": 4, "output_dir": str(tmp_path / "eval"),
              "benchmarks": {"tasks": ["mmlu_tiny", "hellaswag_tiny"], "num_fewshot": {"mmlu_tiny": 2}, "limit": 6},
              "tracking": {"experiment": "test-evaluate-benchmarks"}}
    outputs = evaluate.run(config, {"model": str(model)})

    run = mlflow.MlflowClient().get_run(outputs["mlflow_run_id"])
    for task in ("mmlu_tiny", "hellaswag_tiny"):
        for metric in ("acc", "acc_norm"):
            value, stderr = run.data.metrics[f"{task}/{metric}"], run.data.metrics[f"{task}/{metric}_stderr"]
            assert 0 <= value <= 1 and stderr >= 0
            assert value * 6 == pytest.approx(round(value * 6))  # a share of the 6 documents
    assert "exact_match" in run.data.metrics  # the task suite's metrics stay
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "eval")}
    assert {"eval/lm_eval.json", "eval/benchmarks.md"} <= artifacts
    results = json.loads(open(outputs["eval_lm_eval"]).read())
    assert results["n-shot"]["mmlu_tiny"] == 2 and results["limit"] == 6
    assert "| mmlu_tiny | acc_norm |" in open(outputs["eval_benchmarks"]).read()

    # what register tags the version with and gates on
    metrics = register.read_metrics({"upstream": {"evaluate": outputs}}, "evaluate")
    assert metrics["hellaswag_tiny/acc"] == run.data.metrics["hellaswag_tiny/acc"]
    assert Gate(min=0.0).passes(metrics["hellaswag_tiny/acc"]) and not Gate(min=1.01).passes(metrics["mmlu_tiny/acc"])


@pytest.mark.parametrize("size", ["7b", "13b", "70b"])
def test_the_paper_scale_specs_evaluate_on_the_papers_benchmarks_on_gpus(size):
    spec = load_spec(REPO / f"pipelines/specs/llama2-{size}.yaml")
    cfg = spec.step_config("evaluate")
    tasks, shots = cfg.benchmarks.resolved()
    assert {"mmlu", "hellaswag", "gsm8k", "corral_humaneval", "arc_challenge"} <= set(tasks)
    assert (shots["mmlu"], shots["gsm8k"], shots["corral_humaneval"], shots["hellaswag"]) == (5, 8, 0, 0)
    assert cfg.resources.gpus_per_worker >= 1 and cfg.resources.accelerator_type == "H100"


def test_the_tiny_spec_evaluates_on_local_lm_eval_tasks():
    cfg = load_spec(REPO / "pipelines/specs/llama2-tiny.yaml").step_config("evaluate")
    assert cfg.benchmarks.resolved()[0] == ["mmlu_tiny", "hellaswag_tiny"] and cfg.resources.gpus_per_worker == 0


def test_an_unknown_preset_is_refused_before_anything_runs():
    from pipelines.spec import SpecError, validate_spec

    raw = {"name": "x", "steps": {"evaluate": {"uses": "evaluate", "config": {"benchmarks": {"preset": "llama3"}}}}}
    with pytest.raises(SpecError, match=r"steps\.evaluate\.config\.benchmarks\.preset.*unknown preset 'llama3'"):
        validate_spec(raw)


@pytest.mark.slow  # indexes lm-eval's ~15k built-in tasks (~40 s here)
def test_the_paper_preset_names_tasks_lm_eval_knows():
    from lm_eval.tasks import TaskManager

    from corral.harness import TASKS_DIR
    from corral.paper import BENCHMARK_PRESETS

    known = TaskManager(include_path=str(TASKS_DIR)).all_tasks
    assert set(BENCHMARK_PRESETS["llama2-paper"]) <= set(known)
