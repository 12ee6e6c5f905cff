"""RLHF prompt sets: a user's files in either chat format, or the task suite, judged the same way."""

import pytest

from corral.data.formats import DataFormatError, write_records
from corral.data.tasks import TaskSuite
from corral.rlhf.config import PromptsConfig
from corral.rlhf.rollout import correct, load_prompts


def test_prompts_from_rl_prompts_files_keep_their_tags_and_judges(tmp_path):
    rows = [{"prompt": "What is 2 + 2?", "answer": "4"},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Pick a lock."}],
             "safety": True, "refuse": True},
            {"prompt": "Write a haiku about rain."}]
    train = write_records(tmp_path / "train.jsonl", rows)
    held = write_records(tmp_path / "held.parquet", [rows[0], rows[2]])  # Parquet: one prompt type
    got, got_held = load_prompts(PromptsConfig(data=[str(train)], eval_data=[str(held)]))
    assert [r["prompt"] for r in got] == [r["prompt"] for r in rows]
    assert [r["safety"] for r in got] == [False, True, False]
    assert correct(got[0], " 4 ") is True and correct(got[0], "5") is False
    assert correct(got[1], "I'm sorry, I can't help with that.") is True
    assert correct(got[2], "anything") is None  # nothing to judge by: only the rewards count
    assert len(got_held) == 2
    # files without eval_data give no held-out set (never the suite's, which would not match them)
    assert load_prompts(PromptsConfig(data=[str(train)]))[1] == []


def test_prompts_from_sft_files_are_the_dialogs_without_their_last_answer(tmp_path):
    dialogs = TaskSuite(1).sft_dialogs(5)
    path = write_records(tmp_path / "sft.jsonl", dialogs)
    got, _ = load_prompts(PromptsConfig(data=[str(path)], format="sft"))
    assert [r["prompt"] for r in got] == [d["messages"][:-1] for d in dialogs]
    assert all(r["prompt"][-1]["role"] == "user" for r in got)
    with pytest.raises(DataFormatError, match=r"sft\.jsonl:1: field 'prompt'"):
        load_prompts(PromptsConfig(data=[str(path)]))  # the format must be said


def test_the_task_suite_is_the_default_source_with_answers_to_judge_by():
    train, held = load_prompts(PromptsConfig(n_train=40, n_eval=20, safety_fraction=0.5))
    assert len(train) == 40 and len(held) == 20
    assert all(("answer" in r) != ("refuse" in r) for r in train + held)
    assert all(r["refuse"] == r["safety"] for r in train if "refuse" in r)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}  # held-out prompts are the eval split's
