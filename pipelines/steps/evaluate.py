"""Step: evaluate any checkpoint; writes a table (JSON and Markdown) to MLflow and the numbers as metrics.

inputs: `model` (`config.model` wins); optionally `helpfulness_reward_model` and
`safety_reward_model` (from reward steps, or the config); from a pipeline `output_dir`, `run_id`.
outputs: `eval_table` (JSON), `eval_markdown`, `eval_samples` (every prompt, reply and verdict);
with benchmarks, `eval_lm_eval` (lm-eval's results) and `eval_benchmarks` (beside the paper's).

Measures: perplexity of the held-out answers; greedy replies to the held-out sets through the
shared engine, scored by exact match per task family and by refusal rate on unsafe prompts and
false-refusal rate on safe ones; the mean helpfulness and safety reward of those replies, and
the share of replies to safe prompts that RLHF's safety gate would judge by safety; and the
configured lm-eval tasks (`benchmarks`), each metric and its standard error as `task/metric`.
With `resources.gpus_per_worker > 0` the benchmarks run as a Ray task on such an accelerator.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from corral import load_model, load_reward_model, load_tokenizer, tracking
from corral.config import BenchmarksConfig, EvaluateConfig, ResourcesConfig
from corral.data.formats import read_all
from corral.data.tasks import TaskSuite
from corral.evaluate import dialog_perplexity, generate_replies, normalise, safety_rates, task_accuracy
from corral.rlhf.objectives import gate_rate
from pipelines.steps.common import input_model, output_dir


def run(config: EvaluateConfig | dict, inputs: dict) -> dict:
    cfg = EvaluateConfig.model_validate(config)
    path = input_model(cfg.model, inputs, "evaluate")
    out = output_dir(cfg.output_dir, inputs, "evaluate")
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(path), load_tokenizer(path)
    items = eval_items(cfg)

    replies = generate_replies(model, tokenizer, [i["messages"] for i in items], cfg.max_tokens)
    metrics = task_accuracy(items, replies) | safety_rates(items, replies)
    answered = [i["messages"] + [{"role": "assistant", "content": i["answer"]}] for i in items if "answer" in i]
    if answered:
        metrics["perplexity"] = dialog_perplexity(model, tokenizer, answered)
    dialogs = [i["messages"] + [{"role": "assistant", "content": r}] for i, r in zip(items, replies)]
    for kind in ("helpfulness", "safety"):
        rm_path = getattr(cfg, f"{kind}_reward_model") or inputs.get(f"{kind}_reward_model")
        if rm_path:
            rewards = torch.tensor(load_reward_model(rm_path).score_batch(dialogs))
            metrics[f"reward_{kind}"] = rewards.mean().item()
            if kind == "safety":  # how often RLHF's gate would judge a reply to a safe prompt by safety
                unsafe = torch.tensor([i.get("refuse") is True for i in items])
                metrics["safety_gate_rate"] = gate_rate(torch.sigmoid(rewards), unsafe)
    outputs = {}
    if cfg.benchmarks is not None:
        metrics |= benchmarks(path, cfg.benchmarks, cfg.resources, out / "eval")
        outputs = {"eval_lm_eval": str(out / "eval" / "lm_eval.json"),
                   "eval_benchmarks": str(out / "eval" / "benchmarks.md")}

    outputs |= write_tables(out, path, metrics, items, replies)
    with tracking.step_run(inputs, cfg.tracking.experiment, cfg.tracking.run_name or "evaluate", out) as run_id:
        tracking.log_params(run_id, {"model": str(path), "items": len(items)})
        tracking.log_metrics(run_id, metrics, step=0)
        tracking.log_artifacts(run_id, out / "eval", "eval")
    print(f"evaluate {path}:\n" + (out / "eval" / "eval.md").read_text())
    if "eval_benchmarks" in outputs:
        print(Path(outputs["eval_benchmarks"]).read_text())
    return outputs | {"mlflow_run_id": run_id}


def benchmarks(path: Path, config: BenchmarksConfig, resources: ResourcesConfig, out: Path) -> dict[str, float]:
    """lm-eval tasks here, or as a Ray task on the accelerator the step's resources name."""
    from corral.harness import run_benchmarks

    if resources.gpus_per_worker == 0:
        return run_benchmarks(str(path), config, out)
    import ray

    task = ray.remote(run_benchmarks).options(num_cpus=resources.cpus_per_worker, num_gpus=resources.gpus_per_worker,
                                              accelerator_type=resources.accelerator_type, max_retries=0)
    return ray.get(task.remote(str(path), config, out))


def eval_items(cfg: EvaluateConfig) -> list[dict]:
    if cfg.eval_data:
        return read_all(cfg.eval_data, "eval")
    suite = TaskSuite(cfg.tasks.seed)
    return suite.eval_tasks(cfg.tasks.eval_size) + suite.eval_safety(2 * cfg.tasks.eval_size)


def write_tables(out: Path, model_path: Path, metrics: dict, items: list[dict], replies: list[str]) -> dict:
    d = out / "eval"
    d.mkdir(parents=True, exist_ok=True)
    (d / "eval.json").write_text(json.dumps({"model": str(model_path), "metrics": metrics}, indent=2) + "\n")
    rows = "".join(f"| {k} | {v:.4f} |\n" for k, v in metrics.items())
    (d / "eval.md").write_text(f"Evaluation of `{model_path}`\n\n| metric | value |\n| --- | --- |\n{rows}")
    samples = [{**i, "reply": r, "correct": normalise(r) == normalise(i["answer"]) if "answer" in i else None}
               for i, r in zip(items, replies)]
    (d / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return {"eval_table": str(d / "eval.json"), "eval_markdown": str(d / "eval.md"),
            "eval_samples": str(d / "samples.jsonl")}
