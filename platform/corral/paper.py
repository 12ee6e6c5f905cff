"""The Llama 2 paper's benchmark settings and published numbers, to run and to compare against.

Source: Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models"
(arXiv:2307.09288), appendix A.2.2: Table 19 (MMLU, 5-shot), Table 20 (commonsense reasoning,
0-shot), Table 21 (code generation, pass@1), Table 25 (GSM8K, 8-shot). Pretrained Llama 2 models,
in percent. The paper ran Meta's internal evaluation code, so lm-eval's numbers for the same
checkpoint differ by a point or two (prompt and normalisation details); the table is a reference,
not a test oracle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PaperResult:
    benchmark: str  # as the paper names it
    metric: str  # the lm-eval metric (in `flat_metrics` naming, without the task) it compares with
    shots: int
    llama2: dict[str, float]  # model size -> percent
    table: str


PAPER: dict[str, PaperResult] = {  # lm-eval task -> the paper's number
    "mmlu": PaperResult("MMLU", "acc", 5, {"7B": 45.3, "13B": 54.8, "70B": 68.9}, "Table 19"),
    "boolq": PaperResult("BoolQ", "acc", 0, {"7B": 77.4, "13B": 81.7, "70B": 85.0}, "Table 20"),
    "piqa": PaperResult("PIQA", "acc_norm", 0, {"7B": 78.8, "13B": 80.5, "70B": 82.8}, "Table 20"),
    "hellaswag": PaperResult("HellaSwag", "acc_norm", 0, {"7B": 77.2, "13B": 80.7, "70B": 85.3}, "Table 20"),
    "winogrande": PaperResult("WinoGrande", "acc", 0, {"7B": 69.2, "13B": 72.8, "70B": 80.2}, "Table 20"),
    "arc_easy": PaperResult("ARC-e", "acc_norm", 0, {"7B": 75.2, "13B": 77.3, "70B": 80.2}, "Table 20"),
    "arc_challenge": PaperResult("ARC-c", "acc_norm", 0, {"7B": 45.9, "13B": 49.4, "70B": 57.4}, "Table 20"),
    "corral_humaneval": PaperResult("HumanEval", "pass_at_1", 0, {"7B": 12.8, "13B": 18.3, "70B": 29.9}, "Table 21"),
    "gsm8k": PaperResult("GSM8K", "strict-match/exact_match", 8, {"7B": 14.6, "13B": 28.7, "70B": 56.8},
                         "Table 25"),
}
SIZES = ("7B", "13B", "70B")


BENCHMARK_PRESETS: dict[str, dict[str, int]] = {"llama2-paper": {task: r.shots for task, r in PAPER.items()}}


def side_by_side(metrics: dict[str, float], tasks: Sequence[str] | None = None) -> str:
    """A Markdown table of each task's main metric in percent (`tasks`, default all of them; not
    a group's subtasks), with the paper's Llama 2 numbers beside the tasks it reports.
    `metrics` are named as `corral.harness.flat_metrics` names them."""
    rows = ["| task | metric | this model | " + " | ".join(f"Llama 2 {s}" for s in SIZES) + " |",
            "| --- | --- | --- | " + " | ".join("---" for _ in SIZES) + " |"]
    for task in tasks or sorted({k.split("/", 1)[0] for k in metrics}):
        paper = PAPER.get(task)
        metric = paper.metric if paper else _main_metric(task, metrics)
        value = metrics.get(f"{task}/{metric}")
        if value is None:
            continue
        err = metrics.get(f"{task}/{metric}_stderr")
        ours = f"{100 * value:.1f}" + (f" ± {100 * err:.1f}" if err is not None else "")
        theirs = [f"{paper.llama2[s]:.1f}" if paper else "—" for s in SIZES]
        rows.append(f"| {task} | {metric} | {ours} | " + " | ".join(theirs) + " |")
    return "\n".join(rows) + "\n\nLlama 2 columns: Touvron et al. 2023 (arXiv:2307.09288), tables 19-21 and 25.\n"


def _main_metric(task: str, metrics: dict[str, float]) -> str:
    """The metric to show for a task the paper does not report: the first of the usual ones it has."""
    names = [k.split("/", 1)[1] for k in metrics if k.startswith(f"{task}/") and not k.endswith("_stderr")]
    for preferred in ("acc_norm", "acc", "strict-match/exact_match", "exact_match", "pass_at_1"):
        if preferred in names:
            return preferred
    return names[0]
