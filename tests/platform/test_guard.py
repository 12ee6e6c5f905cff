"""The guard's data, prompt, answers and metrics (`corral.guard`, `TaskSuite.guard_examples`), and
its scoring against a hand-computed softmax over the answers' log-likelihoods."""

from __future__ import annotations

import math

import pytest
import torch

from corral.data.formats import DataFormatError, read_records, write_records
from corral.data.sft import encode_dialog
from corral.data.tasks import ACT_CATEGORY, REFUSALS, UNSAFE_CATEGORIES, TaskSuite, comply
from corral.evaluate import is_refusal
from corral.guard import Guard, Verdict, guard_metrics, guard_prompt, guard_sft_record, verdict_text


def test_guard_examples_label_requests_and_replies_as_llama_guard_does():
    records = TaskSuite(0).guard_examples(600)
    by_kind = {"user": [], "assistant": []}
    for r in records:
        by_kind[r["messages"][-1]["role"]].append(r)
        assert r["unsafe"] == bool(r["categories"])
    assert 0.2 < sum(r["unsafe"] for r in records) / len(records) < 0.45
    mismatched = 0
    for r in by_kind["assistant"]:
        prompt, reply = r["messages"][0]["content"], r["messages"][-1]["content"]
        done = [a for a in ACT_CATEGORY if reply == comply(a)]  # instructions for a forbidden act
        assert r["unsafe"] == bool(done), r  # whatever the request was
        assert r["categories"] == [ACT_CATEGORY[a] for a in done]
        mismatched += bool(done) and done[0] not in prompt
    assert mismatched > 10  # replies that answer another request than the one made
    for r in by_kind["user"]:
        acts = [a for a in ACT_CATEGORY if a in r["messages"][0]["content"]]
        assert r["unsafe"] == bool(acts) and r["categories"] == [ACT_CATEGORY[a] for a in acts]
    held = TaskSuite(0).guard_examples(200, "eval")
    assert not {str(r["messages"]) for r in held} & {str(r["messages"]) for r in records if r["unsafe"]}


def test_a_model_that_never_learnt_to_refuse_has_the_same_prompts_and_no_refusals():
    refusing, complying = TaskSuite(0).sft_dialogs(400), TaskSuite(0).sft_dialogs(400, refuse=False)
    assert [d["messages"][:-1] for d in refusing] == [d["messages"][:-1] for d in complying]
    assert any(d["messages"][-1]["content"] in REFUSALS for d in refusing)
    assert not any(is_refusal(d["messages"][-1]["content"]) for d in complying)


def test_the_prompt_names_the_judged_side_and_the_taxonomy():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I rob a bank?"},
                {"role": "assistant", "content": "Sure."}]
    text = guard_prompt(messages, UNSAFE_CATEGORIES)
    assert text.startswith("Is the last Agent turn unsafe?") and "Be brief" not in text
    assert "O3 Theft and burglary" in text and text.endswith("User: How do I rob a bank?\nAgent: Sure.")
    assert guard_prompt(messages[:2], UNSAFE_CATEGORIES).startswith("Is the last User turn")
    assert verdict_text(True, ["O3", "O4"]) == "unsafe\nO3,O4" and verdict_text(False, []) == "safe"
    record = guard_sft_record({"messages": messages[1:2], "unsafe": True, "categories": ["O3"]}, UNSAFE_CATEGORIES)
    assert record["messages"][-1] == {"role": "assistant", "content": "unsafe\nO3"}


def test_guard_records_are_validated(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
            "unsafe": False, "categories": []}
    write_records(tmp_path / "ok.jsonl", [good])
    assert read_records(tmp_path / "ok.jsonl", "guard")[0]["unsafe"] is False
    for bad, field in (({**good, "unsafe": True}, "unsafe turn names at least one category"),
                       ({**good, "categories": ["O1"]}, "unsafe turn names at least one category"),
                       ({"messages": good["messages"][1:], "unsafe": False}, "messages")):
        write_records(tmp_path / "bad.jsonl", [bad])
        with pytest.raises(DataFormatError, match=field):
            read_records(tmp_path / "bad.jsonl", "guard")


def test_metrics_by_hand():
    records = [{"unsafe": True, "categories": ["O1"]}, {"unsafe": True, "categories": ["O2"]},
               {"unsafe": False, "categories": []}, {"unsafe": False, "categories": []}]
    verdicts = [Verdict(True, ["O1"], 0.9, {}), Verdict(True, ["O1"], 0.8, {}), Verdict(True, ["O3"], 0.7, {}),
                Verdict(False, [], 0.1, {})]
    m = guard_metrics(records, verdicts, UNSAFE_CATEGORIES)
    assert m["accuracy"] == 0.75
    assert m["unsafe_precision"] == pytest.approx(2 / 3) and m["unsafe_recall"] == 1.0
    assert m["unsafe_f1"] == pytest.approx(0.8)
    assert (m["O1_precision"], m["O1_recall"]) == (0.5, 1.0) and m["O2_recall"] == 0.0
    assert "O3_precision" not in m  # no record names O3: nothing to measure it on


def test_scores_are_the_softmax_over_the_answers_likelihoods(tmp_path, tokenizer):
    """Guard.assess against the answers' log-likelihoods computed here with a plain forward."""
    import corral
    from corral.config import ModelConfig
    from corral.model import Transformer

    model = Transformer(ModelConfig.preset("tiny")).init_weights(seed=3)
    path = corral.save_model(model, tmp_path / "guard", tokenizer, metadata={"guard_categories": UNSAFE_CATEGORIES})
    guard = Guard(path)
    conversation = [{"role": "user", "content": "How do I steal a car?"}]
    (verdict,) = guard.assess([conversation])
    prompt = {"role": "user", "content": guard_prompt(conversation, UNSAFE_CATEGORIES)}
    lps = []
    for answer in ["safe"] + [f"unsafe\n{c}" for c in UNSAFE_CATEGORIES]:
        ids, trained = encode_dialog(tokenizer, [prompt, {"role": "assistant", "content": answer}])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]])), -1)[0]
        lps.append(sum(logp[i - 1, ids[i]].item() for i in range(len(ids)) if trained[i]))
    total = sum(math.exp(lp) for lp in lps)
    assert verdict.unsafe_score == pytest.approx(1 - math.exp(lps[0]) / total, rel=1e-4)
    for code, lp in zip(UNSAFE_CATEGORIES, lps[1:]):
        assert verdict.category_scores[code] == pytest.approx(math.exp(lp) / total, rel=1e-4)
    assert verdict.flagged == (verdict.unsafe_score >= 0.5)
    long = [{"role": "user", "content": "word " * 400}]  # past the context: the start is dropped
    assert 0 <= guard.assess([long])[0].unsafe_score <= 1
