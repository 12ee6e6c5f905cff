"""GPU check of the evaluation path: lm-eval with the `corral` model type against lm-eval's `hf`
model on the same random-weight checkpoint, on corral's offline tasks, on one device; prints the
accuracies, the largest log-likelihood gap, and each side's wall time (the ratio is the number to
read), then HumanEval's canonical solutions through the sandbox on that machine.

Needs the project installed (`make install`); no network, no Ray, no MLflow. A tokenizer is
trained on the shipped task data, so the box needs nothing else:

    python benchmarks/gpu_eval_check.py                        # cuda, the `small` preset's shape
    python benchmarks/gpu_eval_check.py --device cpu --preset tiny --limit 4   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def build_checkpoint(root: Path, preset: str) -> tuple[Path, Path]:
    """A random-weight model of `preset`'s shape with a tokenizer trained on the task data."""
    import corral
    from corral.config import ModelConfig
    from corral.harness import TASKS_DIR
    from corral.humaneval import load_problems
    from corral.model import Transformer
    from corral.tokenizer import train_tokenizer

    text = root / "corpus.txt"
    lines = [json.dumps(json.loads(line)) for f in sorted((TASKS_DIR / "data").glob("*.jsonl"))
             for line in f.read_text().splitlines()]
    text.write_text("\n".join(lines + [p["prompt"] + p["canonical_solution"] for p in load_problems()]))
    tokenizer = train_tokenizer([text], vocab_size=1024, out_dir=root / "tokenizer")
    config = ModelConfig.preset(preset).model_copy(update={"vocab_size": tokenizer.vocab_size})
    path = corral.save_model(Transformer(config).init_weights(seed=0), root / "corral", tokenizer)
    return path, corral.export_hf(path, root / "hf")


def evaluate(model: str, model_args: dict, tasks: list[str], limit: int | None, batch_size: int) -> tuple[dict, float]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from corral.harness import TASKS_DIR

    start = time.perf_counter()
    results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, limit=limit, num_fewshot=2,
                                      log_samples=True, batch_size=batch_size,
                                      task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))
    return results, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default all)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    import corral.harness  # noqa: F401  registers the `corral` model type
    from corral.humaneval import load_problems, pass_at_1

    tasks = ["mmlu_tiny", "hellaswag_tiny"]
    with tempfile.TemporaryDirectory() as tmp:
        path, hf = build_checkpoint(Path(tmp), args.preset)
        common = {"device": args.device, "dtype": "float32"}
        mine, t_mine = evaluate("corral", {"pretrained": str(path), **common}, tasks, args.limit, args.batch_size)
        theirs, t_hf = evaluate("hf", {"pretrained": str(hf), "add_bos_token": True, **common}, tasks, args.limit,
                                args.batch_size)
    report = {"device": args.device, "preset": args.preset, "seconds": {"corral": t_mine, "hf": t_hf},
              "hf_over_corral": t_hf / t_mine}
    for task in tasks:
        pairs = [(a["resps"], b["resps"]) for a, b in zip(
            sorted(mine["samples"][task], key=lambda s: s["doc_id"]),
            sorted(theirs["samples"][task], key=lambda s: s["doc_id"]))]
        gap = max(abs(x[0][0] - y[0][0]) for a, b in pairs for x, y in zip(a, b))
        report[task] = {"corral": {k: v for k, v in mine["results"][task].items() if k.startswith("acc")},
                        "hf": {k: v for k, v in theirs["results"][task].items() if k.startswith("acc")},
                        "max_loglikelihood_gap": gap}
    problems = load_problems()
    start = time.perf_counter()
    report["humaneval_canonical_pass_at_1"] = pass_at_1(problems, [p["canonical_solution"] for p in problems])
    report["humaneval_sandbox_seconds"] = time.perf_counter() - start
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
