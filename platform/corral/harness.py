"""corral models in lm-evaluation-harness: the `corral` model type, and running tasks with it.

lm-eval 0.4.13 finds models only in its own registry: it scans no entry-point group. So the
`corral` model type is registered when this module is imported (`register_model("corral")`), which
`corral eval`, the evaluate step and `python -m corral.harness` (lm-eval's own CLI with corral
registered) all do first. pyproject also declares it in the `lm_eval.models` entry-point group,
which later lm-eval releases read by themselves (EleutherAI/lm-evaluation-harness PR 4013).

`CorralLM` answers lm-eval's three request types in batches on the corral engine:
`loglikelihood` and `loglikelihood_rolling` by batched forwards that keep only the scored
positions' logits, `generate_until` through `corral.engine.Engine` (greedy unless the task
samples). Those two primitives, `_score` and `_generate`, are the seam another engine (vLLM)
plugs into. Tokenisation follows lm-eval's `hf` model with `add_bos_token=True`: BOS, then the
SentencePiece ids, so both score an exported checkpoint identically.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

import lm_eval.models  # noqa: F401  lm-eval's own model types: its get_model adds them only to an empty registry
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from corral.checkpoint import load_model, load_tokenizer
from corral.config import BenchmarksConfig
from corral.engine import Engine, SamplingParams, decode_continuation
from corral.evaluate import score_continuations
from corral.paper import side_by_side
from corral.registry import resolve_model

TASKS_DIR = Path(__file__).parent / "tasks"  # corral's own offline tasks (local JSON, HumanEval)
ENGINES = ("corral",)  # "vllm" arrives with the serving-at-scale issue


@register_model("corral")
class CorralLM(TemplateLM):
    """A corral, Hugging Face Llama or Meta Llama 2 checkpoint (a path or `models:/NAME@ALIAS`)
    as an lm-eval model: `lm_eval --model corral --model_args pretrained=PATH`."""

    def __init__(self, pretrained: str, batch_size: int | str = 16, device: str | None = None,
                 dtype: str | None = None, engine: str = "corral", max_batch_size: int | None = None,  # (unused)
                 **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"unknown model_args for --model corral: {', '.join(unknown)}; it takes pretrained, "
                             "batch_size, device, dtype and engine")
        if engine not in ENGINES:
            raise ValueError(f"engine={engine!r}: this build evaluates on {', '.join(ENGINES)}; the vLLM engine "
                             "comes with serving at scale")
        path = resolve_model(pretrained)
        if device is None or device.startswith("cuda") and not torch.cuda.is_available():  # lm-eval's CLI says cuda
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        # bf16 on accelerators (the paper-scale runs), fp32 on CPU (exact parity with the hf reference)
        if dtype in (None, "auto"):
            dtype = "bfloat16" if self._device.type == "cuda" else "float32"
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={dtype!r}: choose float32, bfloat16, float16 or auto")
        self.model = load_model(path, getattr(torch, dtype)).to(self._device)
        self.tokenizer_ = load_tokenizer(path)
        self.path = str(path)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" -> 16
        self.max_length = self.model.config.max_seq_len
        self._engine: Engine | None = None

    # -- what lm-eval's TemplateLM needs ---------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer_.bos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer_.encode(string, bos=add_special_tokens is not False)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer_.decode(tokens)

    def get_model_info(self) -> dict:
        return {"model_path": self.path, "model_num_parameters": self.model.config.num_params(),
                "model_dtype": str(next(self.model.parameters()).dtype)}

    # -- log-likelihoods -------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding yields the continuation)
        for each ((context, continuation), context ids, continuation ids)."""
        rows = []
        for _, context, continuation in requests:
            ids = (context + continuation)[-(self.max_length + 1):]  # keep the end, as lm-eval's hf model does
            rows.append((ids[:-1], ids[len(ids) - len(continuation):]))
        return self._score(rows)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents in disjoint windows of the context (perplexity tasks)."""
        out = []
        for (text,) in [r.args for r in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text, add_special_tokens=False), self.prefix_token_id, self.max_length, 1)]
            out.append(sum(lp for lp, _ in self._loglikelihood_tokens([(None, c, t) for c, t in windows])))
        return out

    def _score(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        return score_continuations(self.model, rows, self.batch_size)

    # -- generation ------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each (context, gen_kwargs) continued until a stop string, EOS or max_gen_toks; requests
        with the same gen_kwargs go to the engine together."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, (_, kwargs) in enumerate(r.args for r in requests):
            groups[json.dumps(kwargs, sort_keys=True, default=str)].append(i)
        out = [""] * len(requests)
        for key, members in groups.items():
            kwargs = json.loads(key)
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            # generation gets at most half the context: tiny models have short ones, tasks ask for 256-1024 tokens
            max_tokens = min(int(kwargs.get("max_gen_toks", 256)), self.max_length // 2)
            sample = kwargs.get("do_sample", False) and float(kwargs.get("temperature", 1.0)) > 0
            params = SamplingParams(max_tokens=max_tokens, stop=until, seed=1234,
                                    temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0)
            prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_tokens):] for i in members]
            for i, prompt, tokens in zip(members, prompts, self._generate(prompts, params)):
                text = decode_continuation(self.tokenizer_, prompt, [t for t in tokens if t != self.eot_token_id])
                for stop in until:
                    text = text.split(stop)[0]
                out[i] = text
        return out

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        if self._engine is None:
            # batch invariance (serving's promise that co-running requests change no bits) is not needed here
            self._engine = Engine(self.model, self.tokenizer_, max_batch_size=self.batch_size, batch_invariant=False)
        return self._engine.generate(prompts, params)


# -- running tasks -------------------------------------------------------------------------------
def run_tasks(model: str | CorralLM, tasks: list[str], num_fewshot: dict[str, int] | None = None,
              limit: int | float | None = None, include_path: list[str] | tuple[str, ...] = (),
              batch_size: int = 16, log_samples: bool = False) -> dict:
    """lm-eval's `simple_evaluate` over `tasks` with a shot count per task (None = the task's own),
    offline (task data from local files only). Returns lm-eval's result dict, merged over the
    runs (one per distinct shot count)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # these machines cannot reach the hub
    os.environ.setdefault("HF_ALLOW_CODE_EVAL", "0")  # code runs only in corral's sandbox
    import lm_eval
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("no tasks to evaluate: name some (e.g. --tasks hellaswag) or a preset")
    lm = model if isinstance(model, CorralLM) else CorralLM(str(model), batch_size=batch_size)
    paths = [str(TASKS_DIR), *map(str, include_path)]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if any(t not in manager.all_tasks for t in tasks):  # indexing lm-eval's ~15k built-in tasks takes ~30 s
        manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}; see `lm-eval ls tasks` or give the "
                         f"directory of your task YAMLs (include_path)")
    shots = num_fewshot or {}
    by_shots: dict[int | None, list[str]] = defaultdict(list)
    for task in tasks:
        by_shots[shots.get(task)].append(task)
    merged: dict = {}
    for n, group in by_shots.items():
        try:
            result = lm_eval.simple_evaluate(model=lm, tasks=group, num_fewshot=n, limit=limit, task_manager=manager,
                                             log_samples=log_samples, confirm_run_unsafe_code=True)
        except ConnectionError as e:  # datasets: not cached, and offline (or no network)
            raise RuntimeError(f"the data of task(s) {', '.join(group)} is not in the local `datasets` cache ({e}); "
                               "fetch it where the Hugging Face hub is reachable (HF_DATASETS_OFFLINE=0), or run "
                               "corral's offline tasks (mmlu_tiny, hellaswag_tiny, gsm8k_tiny, corral_humaneval)"
                               ) from None
        for key in ("results", "n-shot", "versions", "higher_is_better", "samples", "group_subtasks"):
            merged.setdefault(key, {}).update(result.get(key) or {})
    return merged


def run_benchmarks(model: str, config: BenchmarksConfig, out_dir: Path) -> dict[str, float]:
    """The configured lm-eval tasks on `model`: writes lm-eval's results (`lm_eval.json`) and the
    side-by-side table with the paper (`benchmarks.md`) to `out_dir`; returns the flat metrics."""
    tasks, shots = config.resolved()
    results = run_tasks(model, tasks, shots, config.limit, config.include_path, config.batch_size)
    metrics = flat_metrics(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    keep = {k: results.get(k) for k in ("results", "n-shot", "versions", "higher_is_better", "group_subtasks")}
    (out_dir / "lm_eval.json").write_text(json.dumps(keep | {"model": str(model), "limit": config.limit},
                                                     indent=2, default=str) + "\n")
    (out_dir / "benchmarks.md").write_text(f"lm-eval tasks on `{model}`\n\n" + side_by_side(metrics, tasks))
    return metrics


def flat_metrics(results: dict) -> dict[str, float]:
    """lm-eval's per-task numbers as MLflow metric names: `hellaswag/acc_norm`,
    `hellaswag/acc_norm_stderr`, `gsm8k/strict-match/exact_match`, `corral_humaneval/pass_at_1`
    (MLflow allows letters, digits, `_ - . / ` and space only)."""
    out = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filter_ = key.split(",", 1)
            name = f"{task}/{metric}" if filter_ == "none" else f"{task}/{filter_}/{metric}"
            out[re.sub(r"[^\w./ -]", "_", name.replace("@", "_at_"))] = float(value)
    return out


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line with the `corral` model type and corral's tasks available."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" in argv:  # corral's tasks as well as the caller's
        at = argv.index("--include_path") + 1
        argv[at] = f"{TASKS_DIR}{os.pathsep}{argv[at]}"
    else:
        argv += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm-eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
