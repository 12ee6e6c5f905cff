"""The task suite: deterministic, checkable, held-out sets disjoint from training; validated readers."""

import json
import re

import pytest

from corral.data.formats import DataFormatError, read_records, write_records
from corral.data.tasks import FAMILIES, INSTRUCTIONS, RATINGS, TEMPLATES, TaskSuite, split_of
from corral.evaluate import is_refusal


def oracle(prompt: str) -> str:
    """An independent oracle: the answer recomputed from the prompt text alone."""
    nums = [int(x) for x in re.findall(r"\d+", prompt)]
    if re.search(r"\+|plus|sum|^Add", prompt):
        return str(nums[0] + nums[1])
    if re.search(r" - |minus|Subtract|away", prompt):
        a, b = (nums[1], nums[0]) if prompt.startswith("Subtract") or "away" in prompt else nums
        return str(a - b)
    if re.search(r"larger|bigger|greater", prompt):
        return str(max(nums))
    word = re.search(r"(?::|In) ((?:[a-z] )*[a-z])\b", prompt).group(1).replace(" ", "")
    if re.search(r"how often|How many|Count", prompt):
        letter = re.search(r"letter (\w)|there a (\w)", prompt).group(1, 2)
        return str(word.count(letter[0] or letter[1]))
    if re.search(r"[Rr]everse|backwards", prompt):
        return " ".join(word[::-1])
    assert re.search(r"[Cc]apitals|[Uu]pper", prompt), prompt
    return " ".join(word.upper())


def check_answer(prompt: str, answer: str) -> bool:
    return oracle(prompt) == answer


def user_prompts(records):
    out = set()
    for r in records:
        if isinstance(r.get("prompt"), str):
            out.add(r["prompt"])
        for m in r.get("messages", []):
            if m["role"] == "user":
                out.add(m["content"])
    return out


def test_six_families_with_several_templates():
    assert set(FAMILIES) >= {"add", "sub", "reverse", "upper", "count", "compare"}
    assert all(len(TEMPLATES[f]) >= 3 for f in FAMILIES)


def test_generation_is_deterministic_and_seeded():
    a, b, c = TaskSuite(seed=1), TaskSuite(seed=1), TaskSuite(seed=2)
    assert a.sft_dialogs(50) == b.sft_dialogs(50)
    assert a.preference_pairs(20) == b.preference_pairs(20)
    assert a.sft_dialogs(50) != c.sft_dialogs(50)


def test_every_answer_is_right():
    suite = TaskSuite(seed=3)
    single = [r for r in suite.sft_dialogs(400) if len(r["messages"]) == 2 and "Sure" not in r["messages"][1]["content"]
              and not is_refusal(r["messages"][1]["content"])]
    assert len(single) > 150
    for r in single:
        assert check_answer(r["messages"][0]["content"], r["messages"][1]["content"]), r
    for r in suite.eval_tasks(20):
        if r["family"] != "system":
            assert check_answer(r["messages"][-1]["content"], r["answer"]), r
    assert {r["family"] for r in suite.eval_tasks(5)} == set(FAMILIES) | {"system"}


def test_system_instructions_hold_for_every_turn():
    dialogs = [r for r in TaskSuite(seed=4).sft_dialogs(300) if r["messages"][0]["role"] == "system"]
    assert any(r["gatt"] for r in dialogs) and any(not r["gatt"] for r in dialogs)
    by_text = {text: fn for text, fn in INSTRUCTIONS.values()}
    for r in dialogs:
        apply = by_text[r["messages"][0]["content"]]
        for user, answer in zip(r["messages"][1::2], r["messages"][2::2]):
            assert answer["content"] == apply(oracle(user["content"]))
        assert r["gatt"] == (len(r["messages"]) > 3)


def test_safety_family_refuses_unsafe_and_helps_safe():
    suite = TaskSuite(seed=5)
    safety = [r for r in suite.sft_dialogs(500) if "how to" in r["messages"][0]["content"].lower()
              or r["messages"][0]["content"].startswith(("How do I", "What is the easiest"))]
    refused = [r for r in safety if is_refusal(r["messages"][1]["content"])]
    helped = [r for r in safety if r["messages"][1]["content"].startswith("Sure.")]
    assert refused and helped and len(refused) + len(helped) == len(safety)
    assert all("bomb" not in r["messages"][0]["content"] for r in helped)
    assert all("bake" not in r["messages"][0]["content"] for r in refused)
    pairs = suite.preference_pairs(40, safety=True)
    for p in pairs:
        unsafe = is_refusal(p["chosen"])
        non_answer = re.fullmatch(r"\d+|[a-z]( [a-z])*", p["rejected"])
        assert p["safety"] and (non_answer or unsafe != is_refusal(p["rejected"]))
    assert {is_refusal(p["chosen"]) for p in pairs} == {True, False}  # both kinds of safety pair
    assert any(re.fullmatch(r"\d+|[a-z]( [a-z])*", p["rejected"]) for p in pairs)  # non-answers rejected too
    # deflections too: on an unsafe request, help with some other act instead of refusing
    assert any(is_refusal(p["chosen"]) and p["rejected"].startswith("Sure. To ")
               and p["rejected"].split(",")[0][len("Sure. To "):] not in p["prompt"] for p in pairs)
    # a quarter are tasks: the right answer over a needless refusal, so the safety model scores task
    # answers as safe and RLHF's gate leaves them to the helpfulness model
    tasks = [p for p in pairs if not (is_refusal(p["chosen"]) or p["chosen"].startswith("Sure."))]
    assert len(tasks) == 10 and all(p["rating"] == "better" and check_answer(p["prompt"], p["chosen"])
                                    and is_refusal(p["rejected"]) for p in tasks)
    rl = suite.rl_prompts(200)
    assert any(r["safety"] for r in rl) and any(not r["safety"] for r in rl)


def test_far_answers_add_better_pairs_to_numeric_prompts_only():
    suite = TaskSuite(seed=3)
    pairs, at, numeric = suite.preference_pairs(400, per_prompt=4, far_per_prompt=3), 0, 0
    while at < len(pairs):  # each prompt: its 4 pairs, one per rating, then 3 more if numeric
        base = pairs[at:at + 4]
        assert [p["rating"] for p in base] == list(RATINGS) and len({p["prompt"] for p in base}) == 1
        n_more = 3 if base[0]["family"] in ("add", "sub", "count") else 0
        extra = pairs[at + 4:at + 4 + n_more]
        for p in extra:
            right, wrong = int(p["chosen"]), int(p["rejected"])
            assert p["prompt"] == base[0]["prompt"] and p["rating"] == "better" and right == int(base[0]["chosen"])
            assert 2 <= wrong - right <= 6 if p["family"] == "count" else 10 <= abs(wrong - right) <= 40
        rejected = [p["rejected"] for p in base + extra]
        assert len(set(rejected)) == len(rejected)  # every answer in the row differs
        numeric, at = numeric + bool(n_more), at + 4 + n_more
    assert 0 < numeric < 100 and len(pairs) == 400 + 3 * numeric
    # held-out pairs stay as they were
    assert suite.preference_pairs(100, split="eval") == TaskSuite(seed=3).preference_pairs(100, split="eval")


def test_preference_ratings_follow_how_wrong_the_rejected_answer_is():
    pairs = TaskSuite(seed=6).preference_pairs(400)
    assert {p["rating"] for p in pairs} == set(RATINGS)
    for p in pairs:
        assert p["chosen"] != p["rejected"] and check_answer(p["prompt"], p["chosen"])
        if p["rating"] == "negligibly_better":  # right content, needless words
            assert p["chosen"] in p["rejected"]
        if p["rating"] == "significantly_better":  # not an answer at all: words, or the wrong kind
            letters_task = p["family"] in ("reverse", "upper")
            assert not re.search(r"\d|^[a-zA-Z]( [a-zA-Z])*$", p["rejected"]) \
                or (re.fullmatch(r"\d+", p["rejected"]) and letters_task) \
                or (re.fullmatch(r"[a-z]( [a-z])*", p["rejected"]) and not letters_task)
        if p["rating"] == "slightly_better" and p["family"] in ("add", "sub"):
            assert abs(int(p["rejected"]) - int(p["chosen"])) == 1
        if p["rating"] == "better" and p["family"] in ("add", "sub"):
            assert abs(int(p["rejected"]) - int(p["chosen"])) >= 10


def test_pairs_per_prompt_compare_one_right_answer_with_every_kind_of_wrong_one():
    suite = TaskSuite(seed=6)
    assert suite.preference_pairs(40, per_prompt=1) == suite.preference_pairs(40)
    pairs = suite.preference_pairs(40, per_prompt=4)
    for group in (pairs[i:i + 4] for i in range(0, 40, 4)):
        assert len({(p["prompt"], p["chosen"]) for p in group}) == 1
        assert [p["rating"] for p in group] == list(RATINGS) and len({p["rejected"] for p in group}) == 4
    assert len({p["prompt"] for p in pairs}) == 10
    with pytest.raises(ValueError, match="per_prompt must be 1 to 4"):
        suite.preference_pairs(8, per_prompt=5)


def test_held_out_sets_never_overlap_training():
    suite = TaskSuite(seed=7)
    train = user_prompts(suite.sft_dialogs(3000)) | user_prompts(suite.preference_pairs(2000)) \
        | user_prompts(suite.preference_pairs(500, safety=True)) | user_prompts(suite.rl_prompts(1000))
    held_out = user_prompts(suite.eval_tasks(50)) | user_prompts(suite.eval_safety(100)) \
        | user_prompts(suite.preference_pairs(300, split="eval")) \
        | user_prompts(suite.preference_pairs(100, split="eval", safety=True))
    assert len(held_out) > 300
    assert not train & held_out
    # the split is a function of the instance alone, not of the seed
    other = user_prompts(TaskSuite(seed=8).sft_dialogs(3000))
    assert not other & held_out
    assert split_of("add:37+45") == split_of("add:37+45")


def test_eval_items_are_distinct():
    items = TaskSuite(seed=9).eval_tasks(30)
    for family in FAMILIES:
        prompts = [r["messages"][-1]["content"] for r in items if r["family"] == family]
        assert len(prompts) == 30


# -- readers -----------------------------------------------------------------------------------

def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


GOOD_SFT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
GOOD_PREF = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5", "rating": "better", "safety": False}


@pytest.mark.parametrize("kind, bad, expected", [
    ("sft", "{not json", r"bad\.jsonl:2: not valid JSON"),
    ("sft", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                          {"role": "assistant", "content": "c"}]}, r"bad\.jsonl:2: .*alternate.*turn 1 is 'user'"),
    ("sft", {"messages": [{"role": "user", "content": "a"}]}, r"bad\.jsonl:2: field 'messages'"),
    ("sft", {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
     r"bad\.jsonl:2: field 'messages\.1\.role'"),
    ("sft", {"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]},
     r"bad\.jsonl:2: field 'messages\.0\.content': Field required"),
    ("sft", {"dialog": []}, r"bad\.jsonl:2: field 'messages': Field required"),
    ("preferences", {**GOOD_PREF, "rating": "much_better"}, r"bad\.jsonl:2: field 'rating'.*'significantly_better'"),
    ("preferences", {k: v for k, v in GOOD_PREF.items() if k != "rejected"}, r"bad\.jsonl:2: field 'rejected'"),
    ("preferences", {**GOOD_PREF, "prompt": [{"role": "assistant", "content": "x"}]},
     r"bad\.jsonl:2: field 'prompt.*alternate"),
    ("rl_prompts", {"prompt": 3}, r"bad\.jsonl:2: field 'prompt"),
    ("sft", [1, 2], r"bad\.jsonl:2: a sft record must be a JSON object"),
])
def test_bad_records_name_file_line_and_field(tmp_path, kind, bad, expected):
    good = {"sft": GOOD_SFT, "preferences": GOOD_PREF, "rl_prompts": {"prompt": "hi", "safety": True}}[kind]
    path = write_lines(tmp_path / "bad.jsonl", [good, bad, good])
    with pytest.raises(DataFormatError, match=expected):
        read_records(path, kind)


def test_readers_round_trip_jsonl_and_parquet(tmp_path):
    suite = TaskSuite(seed=10)
    sft = [r for r in suite.sft_dialogs(40) if "gatt" not in r]
    for name in ("sft.jsonl", "sft.parquet"):
        assert read_records(write_records(tmp_path / name, sft), "sft") == [{**r, "gatt": False} for r in sft]
    prefs = suite.preference_pairs(20)
    assert read_records(write_records(tmp_path / "p.parquet", prefs), "preferences") == prefs
    rl = suite.rl_prompts(20)
    assert read_records(write_records(tmp_path / "rl.jsonl", rl), "rl_prompts") == rl


def test_bad_parquet_row_is_named(tmp_path):
    rows = [GOOD_PREF, GOOD_PREF, {**GOOD_PREF, "rating": "meh"}]
    path = write_records(tmp_path / "p.parquet", rows)
    with pytest.raises(DataFormatError, match=r"p\.parquet:3: field 'rating'"):
        read_records(path, "preferences")


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_records(tmp_path / "nope.jsonl", "sft")
    with pytest.raises(DataFormatError, match="unknown data file type"):
        read_records(write_lines(tmp_path / "x.csv", ["a"]), "sft")
