"""A reward model, helpfulness or safety, as a `TrainJob` (Llama 2, section 3.2.2).

The model is the SFT checkpoint with its LM head replaced by a scalar head (`corral.reward`).
Training: the margin ranking loss (`corral.train.losses.reward_loss`) over rows that hold one
prompt and every answer its pairs compare (`encode_pairs`); `micro_batch_size` counts rows.
Safety trains on safety pairs with `helpfulness_mix` (~10 %) helpfulness pairs mixed in,
helpfulness on helpfulness pairs with `safety_mix` (~10 %) safety pairs: without them the
helpfulness model scores refusals of safe requests highly and PPO learns to refuse
(docs/design-notes.md). After training, `evaluate_pairs` scores the held-out pairs.
"""

from __future__ import annotations

import json
import random
from functools import partial
from pathlib import Path

import numpy as np

from corral.checkpoint import load_tokenizer, read_config
from corral.config import RewardConfig
from corral.data.formats import held_out, prompt_messages, read_all
from corral.data.sft import encode_dialog
from corral.data.tasks import TaskSuite
from corral.reward import RewardModel, pairwise_metrics, reward_init
from corral.train.loop import TrainJob, items_dataset, steps_for
from corral.train.pretrain import export_model, training_dtype
from corral.train.losses import MARGINS, reward_loss

MAX_ANSWERS = 8  # answers in one row; a prompt compared across more answers takes several rows


def preference_records(cfg: RewardConfig) -> tuple[list[dict], list[dict]]:
    """(train, held-out) pairs; each kind mixes in a share of the other's pairs for training."""
    if cfg.data:
        records = read_all(cfg.data, "preferences")
        if cfg.eval_data:
            held = read_all(cfg.eval_data, "preferences")
        else:
            records, held = held_out(records, cfg.val_fraction, cfg.loop.seed)
        safety, helpful = [r for r in records if r["safety"]], [r for r in records if not r["safety"]]
        held = [r for r in held if r["safety"] == (cfg.kind == "safety")] or held
    else:
        suite, n, n_eval = TaskSuite(cfg.tasks.seed), cfg.tasks.train_size, cfg.tasks.eval_size
        safety = suite.preference_pairs(n, safety=True)
        helpful = suite.preference_pairs(n, per_prompt=cfg.pairs_per_prompt, far_per_prompt=cfg.far_per_prompt)
        held = suite.preference_pairs(n_eval, split="eval", safety=cfg.kind == "safety")
    own, other, mix = ((helpful, safety, cfg.safety_mix) if cfg.kind == "helpfulness"
                       else (safety, helpful, cfg.helpfulness_mix))
    n_mix = round(len(own) * mix / (1 - mix))
    train = own + random.Random(cfg.loop.seed).sample(other, min(n_mix, len(other)))
    if not train:
        raise ValueError(f"no {cfg.kind} preference pairs to train on (safety pairs have \"safety\": true)")
    random.Random(cfg.loop.seed).shuffle(train)
    return train, held


def reward_job(cfg: RewardConfig, base: str | Path, out: Path) -> tuple[TrainJob, dict, list[dict]]:
    """The TrainJob, the Ray datasets and the held-out pairs of a reward model trained from `base`."""
    tokenizer, model_config = load_tokenizer(base), read_config(base)
    train, held = preference_records(cfg)
    rows = encode_pairs(tokenizer, train, cfg.margin, model_config.max_seq_len)
    datasets = {"train": items_dataset(rows),
                "validation": items_dataset(encode_pairs(tokenizer, held, cfg.margin, model_config.max_seq_len))}
    n_rows = len(rows["tokens"])
    loop = cfg.loop.model_copy(update={"max_steps": steps_for(cfg.epochs, n_rows, cfg.loop, cfg.resources,
                                                               cfg.deepspeed)})
    job = TrainJob(
        name=f"reward-{cfg.kind}", storage_path=str(out / "ray"),
        build_model=partial(RewardModel, model_config), weights=partial(reward_init, base), loss_fn=reward_loss,
        loop=loop, deepspeed=cfg.deepspeed, optim=cfg.optim, resources=cfg.resources,
        export=partial(export_model, config=model_config, tokenizer_path=str(tokenizer.path), head="reward",
                       metadata={"stage": f"reward-{cfg.kind}", "base_model": str(base), "margin": cfg.margin},
                       dtype=training_dtype(cfg.deepspeed),
                       shard_bytes=cfg.loop.export_shard_mb * 2**20),
        export_dir=str(out / "model"), params={"base_model": str(base), "train_pairs": len(train),
                                               "train_rows": n_rows},
    )
    print(f"reward ({cfg.kind}): {len(train)} pairs on {n_rows} prompts, {len(held)} held out, "
          f"{loop.max_steps} steps of {loop.micro_batch_size} prompts from {base}")
    return job, datasets, held


def answer_dialog(prompt: str | list, answer: str) -> list[dict]:
    return prompt_messages(prompt) + [{"role": "assistant", "content": answer}]


def pair_dialogs(record: dict) -> tuple[list[dict], list[dict]]:
    return answer_dialog(record["prompt"], record["chosen"]), answer_dialog(record["prompt"], record["rejected"])


def encode_pairs(tokenizer, records: list[dict], margin: str, max_len: int) -> dict[str, np.ndarray]:
    """One row per prompt: the prompt once, then every answer its pairs compare, as numpy columns.

    InstructGPT trains on all comparisons of a prompt as one batch element (Ouyang et al. 2022,
    3.5): the prompt, most of a pair's tokens, goes through the model once, not twice per pair.
    Each answer sees only the prompt and itself (`corral.reward.branch_layout`), so its reward is
    the one it would get alone. Columns: right-padded `tokens` and `branches` (0 the prompt, k
    answer k); `ends`, where each answer ends in its row; per pair `chosen` and `rejected` (answer
    indices into `ends`), `margin` and `is_pair` (False on padding).

    Longer dialogs keep their last `max_len` tokens: the reward is read at the end.
    """
    by_prompt: dict[str, list[dict]] = {}
    for record in records:
        by_prompt.setdefault(json.dumps(prompt_messages(record["prompt"])), []).append(record)
    rows = []  # (prompt, answers, [(chosen index, rejected index, margin)])
    for group in by_prompt.values():
        answers: list[str] = []
        pairs: list[tuple[int, int, float]] = []
        for record in group:
            both = (record["chosen"], record["rejected"])
            if len(set(answers) | set(both)) > MAX_ANSWERS:
                rows.append((group[0]["prompt"], answers, pairs))
                answers, pairs = [], []
            answers += [a for a in dict.fromkeys(both) if a not in answers]
            pairs.append((answers.index(both[0]), answers.index(both[1]), MARGINS[margin][record["rating"]]))
        rows.append((group[0]["prompt"], answers, pairs))

    ids, branches, ends = zip(*(prompt_row(tokenizer, prompt, answers, max_len) for prompt, answers, _ in rows))
    n, width = len(rows), max(map(len, ids))
    n_answers, n_pairs = max(len(a) for _, a, _ in rows), max(len(p) for _, _, p in rows)
    cols = {"tokens": np.zeros((n, width), dtype=np.int64), "branches": np.zeros((n, width), dtype=np.int64),
            "ends": np.zeros((n, n_answers), dtype=np.int64), "chosen": np.zeros((n, n_pairs), dtype=np.int64),
            "rejected": np.zeros((n, n_pairs), dtype=np.int64), "margin": np.zeros((n, n_pairs), dtype=np.float32),
            "is_pair": np.zeros((n, n_pairs), dtype=bool)}
    for i, (row, branch, row_ends, (_, _, pairs)) in enumerate(zip(ids, branches, ends, rows)):
        cols["tokens"][i, : len(row)] = row
        cols["branches"][i] = branch + [branch[-1]] * (width - len(row))  # padding continues the last answer
        cols["ends"][i] = row_ends + [row_ends[-1]] * (n_answers - len(row_ends))
        for name, values in zip(("chosen", "rejected", "margin", "is_pair"), (*zip(*pairs), [True] * len(pairs))):
            cols[name][i, : len(pairs)] = values
    return cols


def prompt_row(tokenizer, prompt: str | list, answers: list[str], max_len: int) -> tuple[list, list, list]:
    """Token ids, branch ids and answer ends of one row: the prompt once, then each answer's own tokens."""
    dialogs = [encode_dialog(tokenizer, answer_dialog(prompt, a))[0][-max_len:] for a in answers]
    shared = 0  # the prompt's tokens: what every answer's dialog starts with (each keeps one of its own)
    while shared < min(map(len, dialogs)) - 1 and len({d[shared] for d in dialogs}) == 1:
        shared += 1
    ids, branches, ends = dialogs[0][:shared], [0] * shared, []
    for k, dialog in enumerate(dialogs, start=1):
        ids, branches = ids + dialog[shared:], branches + [k] * (len(dialog) - shared)
        ends.append(len(ids))
    return ids, branches, ends


def evaluate_pairs(model: RewardModel, records: list[dict]) -> dict[str, float]:
    """Pairwise accuracy overall and per rating bucket, and the mean reward gap, on held-out pairs."""
    chosen, rejected = zip(*(pair_dialogs(r) for r in records))
    ratings = [r["rating"] for r in records]
    return pairwise_metrics(model.score_batch(chosen), model.score_batch(rejected), ratings)
