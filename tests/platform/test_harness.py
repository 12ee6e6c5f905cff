"""corral as an lm-evaluation-harness model, checked against lm-eval's own Hugging Face model on
the same exported weights, on local tasks in MMLU's, HellaSwag's and GSM8K's formats (offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import corral
from corral.config import ModelConfig
from corral.harness import TASKS_DIR, CorralLM, flat_metrics, run_tasks
from corral.humaneval import load_problems
from corral.model import Transformer

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    """A tiny random-weight model in corral's format and as a Hugging Face directory."""
    root = tmp_path_factory.mktemp("harness")
    path = corral.save_model(Transformer(ModelConfig.preset("tiny")).init_weights(seed=0), root / "corral", tokenizer)
    return {"corral": path, "hf": corral.export_hf(path, root / "hf")}


def evaluate(model: str, model_args: dict, tasks: list[str], **kwargs) -> dict:
    """lm-eval's simple_evaluate by model type name, as its command line does."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, log_samples=True,
                                   task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
                                   **kwargs)


def loglikelihoods(results: dict, task: str) -> list[list[float]]:
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[r[0][0] for r in s["resps"]] for s in samples]


def test_corral_scores_multiple_choice_as_lm_evals_hf_model_does(checkpoint):
    """MMLU format (letters after the question, 2 shots) and HellaSwag format (endings, acc_norm
    per byte): the same accuracies and per-choice log-likelihoods within 1e-4."""
    tasks = ["mmlu_tiny", "hellaswag_tiny"]
    mine = evaluate("corral", {"pretrained": str(checkpoint["corral"])}, tasks, num_fewshot=2, batch_size=8)
    theirs = evaluate("hf", {"pretrained": str(checkpoint["hf"]), "dtype": "float32", "add_bos_token": True,
                             "device": "cpu"}, tasks, num_fewshot=2, batch_size=8)
    for task in tasks:
        ours, ref = loglikelihoods(mine, task), loglikelihoods(theirs, task)
        assert len(ours) == 12 and all(len(row) == 4 for row in ours)
        for a, b in zip(ours, ref):
            assert a == pytest.approx(b, abs=1e-4)
        for metric in ("acc,none", "acc_norm,none"):
            assert mine["results"][task][metric] == theirs["results"][task][metric], (task, metric)
    # the shots came from the dev split: the prompt holds two worked examples before the question
    first = sorted(mine["samples"]["mmlu_tiny"], key=lambda s: s["doc_id"])[0]
    assert first["arguments"][0][0].count("\nAnswer:") == 3


def test_rolling_loglikelihood_is_the_documents_log_probability(checkpoint, tokenizer):
    """loglikelihood_rolling (perplexity tasks) on a short document: log p(text | BOS) from one
    plain forward of the model, by hand; a long one is scored in windows of the context."""
    import torch
    from lm_eval.api.instance import Instance

    texts = ["Now is the winter of our discontent", "To be, or not to be: that is the question. " * 40]
    lm = CorralLM(str(checkpoint["corral"]))
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    short, long = lm.loglikelihood_rolling(requests)
    ids = [tokenizer.bos_id] + tokenizer.encode(texts[0], bos=False)
    with torch.no_grad():
        logp = torch.log_softmax(corral.load_model(checkpoint["corral"])(torch.tensor([ids]))[0], dim=-1)
    assert short == pytest.approx(sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids))), abs=1e-4)
    assert len(tokenizer.encode(texts[1])) > 2 * lm.max_length and long < short < 0


def test_greedy_generation_matches_hf_generate(checkpoint):
    """generate_until on the corral engine: the same greedy text as lm-eval's hf model (GSM8K format)."""
    gen = {"max_gen_toks": 12}
    mine = evaluate("corral", {"pretrained": str(checkpoint["corral"])}, ["gsm8k_tiny"], num_fewshot=1, limit=3,
                    gen_kwargs=gen)
    theirs = evaluate("hf", {"pretrained": str(checkpoint["hf"]), "dtype": "float32", "add_bos_token": True,
                             "device": "cpu"}, ["gsm8k_tiny"], num_fewshot=1, limit=3, gen_kwargs=gen)
    texts = [[s["resps"][0][0] for s in sorted(r["samples"]["gsm8k_tiny"], key=lambda s: s["doc_id"])]
             for r in (mine, theirs)]
    assert all(texts[0])
    # hf decodes the continuation alone, and SentencePiece drops its first leading space; corral
    # keeps it (decoding after the prompt's last token), as HumanEval's indented bodies need
    assert [t.removeprefix(" ") for t in texts[0]] == texts[1]


class Scripted(CorralLM):
    """The corral model type with the engine's output replaced by set replies, as the token ids
    a model would generate for them after the prompt: the rest of the path (decoding, stop
    strings, lm-eval's filters and metrics) is the real one."""

    def __init__(self, path: str, reply_for):
        super().__init__(path)
        self.reply_for = reply_for  # prompt text -> reply text

    def _generate(self, prompts, params):
        out = []
        for prompt in prompts:
            text = self.tokenizer_.decode(prompt)
            whole = self.tokenizer_.encode(text + self.reply_for(text), bos=False)
            out.append(whole[len(self.tokenizer_.encode(text, bos=False)):])
        return out


def test_gsm8k_answers_are_extracted_strictly_and_flexibly(checkpoint):
    docs = [json.loads(line) for line in (TASKS_DIR / "data/gsm8k_tiny.test.jsonl").read_text().splitlines()]
    answers = [d["answer"].rsplit("#### ", 1)[1] for d in docs]
    replies = {
        docs[0]["question"]: f"We multiply.\n#### {answers[0]}\n\nQuestion: and then the model goes on #### 999",
        docs[1]["question"]: f"So the answer is {answers[1]}.",  # no "####": only the flexible filter finds it
        docs[2]["question"]: "#### 1,000,000",  # wrong
        docs[3]["question"]: f"{answers[3]} apples, then {int(answers[3]) + 1} pears",  # flexible takes the last
    }
    lm = Scripted(str(checkpoint["corral"]),
                  lambda prompt: next(r for q, r in replies.items() if q in prompt.rsplit("Question:", 1)[-1]))
    results = run_tasks(lm, ["gsm8k_tiny"], {"gsm8k_tiny": 2}, limit=4, log_samples=True)
    metrics = flat_metrics(results)
    assert metrics["gsm8k_tiny/strict-match/exact_match"] == pytest.approx(1 / 4)
    assert metrics["gsm8k_tiny/flexible-extract/exact_match"] == pytest.approx(2 / 4)
    first = sorted(results["samples"]["gsm8k_tiny"], key=lambda s: s["doc_id"])[0]
    assert "Question:" not in first["resps"][0][0]  # generation stopped at the next question
    assert first["arguments"][0][0].count("Question:") == 3  # two shots and the question


def test_humaneval_through_lm_eval_runs_in_the_sandbox(checkpoint):
    problems = load_problems()[:6]
    # tiny's 256-token context keeps only each prompt's end, which still identifies its problem
    lm = Scripted(str(checkpoint["corral"]), lambda prompt: next(p["canonical_solution"] for p in problems
                                                                 if p["prompt"].endswith(prompt.strip(" "))))
    metrics = flat_metrics(run_tasks(lm, ["corral_humaneval"], limit=6))
    # the decoded completions keep their indentation, and the stop strings ("\ndef", "\nif", ...)
    # cut none of the canonical bodies
    assert metrics["corral_humaneval/pass_at_1"] == 1.0


@pytest.mark.slow  # lm-eval's command line indexes its ~15k built-in tasks first (~1 min here)
def test_the_lm_eval_command_line_knows_corral(checkpoint, tmp_path):
    out = subprocess.run([sys.executable, "-m", "corral.harness", "--model", "corral", "--model_args",
                          f"pretrained={checkpoint['corral']}", "--tasks", "hellaswag_tiny", "--limit", "3",
                          "--output_path", str(tmp_path)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "hellaswag_tiny" in out.stdout and "acc_norm" in out.stdout


def test_corral_eval_prints_the_paper_beside_the_model(checkpoint, capsys, tmp_path):
    from corral.cli import main

    assert main(["eval", str(checkpoint["corral"]), "--tasks", "corral_humaneval,hellaswag_tiny", "--limit", "2",
                 "--output-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    humaneval = next(line for line in printed.splitlines() if line.startswith("| corral_humaneval"))
    assert [c.strip() for c in humaneval.strip("|").split("|")][-3:] == ["12.8", "18.3", "29.9"]
    assert "| hellaswag_tiny | acc_norm |" in printed
    saved = json.loads((tmp_path / "lm_eval.json").read_text())
    assert set(saved["results"]) == {"corral_humaneval", "hellaswag_tiny"}


def test_unknown_tasks_and_engines_are_named(checkpoint):
    with pytest.raises(ValueError, match="unknown lm-eval task.*no_such_task"):
        run_tasks(str(checkpoint["corral"]), ["no_such_task"])
    with pytest.raises(ValueError, match="engine='vllm'"):
        CorralLM(str(checkpoint["corral"]), engine="vllm")
