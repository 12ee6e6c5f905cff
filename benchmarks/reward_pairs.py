"""Reward-model training: one row per prompt (the prompt once) against two rows per pair.

The reward step used to run the chosen and the rejected dialog as two rows; it now puts the prompt
once and every answer its pairs compare after it (`corral.model.branch_layout`), each answer seeing
only the prompt and itself. Same rewards, fewer tokens. This times, in one process, on the task
suite's helpfulness pairs: forward, backward and an AdamW step of the tiny reward model, batches of
8 rows, each batch cut to its own widest row, as the step does, for
  (a) two rows per pair (the former layout), pairs drawn one per prompt;
  (b) one row per prompt, the same pairs;
  (c) one row per prompt, four pairs per prompt (`pairs_per_prompt: 4`, one per rating).
Writes benchmarks/results/reward_pairs.json; the ratio that matters is ms per 1,000 pairs.

    .venv/bin/python benchmarks/reward_pairs.py [--threads 1 --steps 60 --dim 192 --layers 4 --heads 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # pipelines.steps
RESULTS = ROOT / "benchmarks" / "results" / "reward_pairs.json"
CORPUS = ROOT.parent / "shared" / "data" / "gutenberg"


def separate_rows(tokenizer, records: list[dict], max_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The former layout: chosen and rejected dialogs as two rows each, batches of 8 pairs."""
    from corral.data.sft import encode_dialog
    from corral.reward import pad_batch
    from corral.train.reward import pair_dialogs

    out = []
    for i in range(0, len(records) - 7, 8):
        sides = [pair_dialogs(r) for r in records[i:i + 8]]
        ids = [encode_dialog(tokenizer, s[0])[0][-max_len:] for s in sides] + \
              [encode_dialog(tokenizer, s[1])[0][-max_len:] for s in sides]
        out.append(pad_batch(ids))
    return out


def time_steps(model, batches: list, loss, steps: int) -> tuple[float, float]:
    """Median ms per optimizer step and mean tokens per step over `steps` batches (after 5 warm-up)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times, tokens = [], []
    for batch in batches[: steps + 5]:
        t = time.perf_counter()
        value, n = loss(model, batch)
        value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        tokens.append(n)
    return 1000 * statistics.median(times[5:]), float(np.mean(tokens[5:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="the tiny spec trains each reward model on one core")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from corral.config import ModelConfig
    from corral.data.tasks import TaskSuite
    from corral.model import Transformer
    from corral.reward import RewardModel
    from corral.train.losses import ranking_loss
    from corral.tokenizer import load_tokenizer, train_tokenizer
    from corral.train.losses import reward_loss
    from corral.train.reward import encode_pairs

    with tempfile.TemporaryDirectory() as d:
        train_tokenizer(sorted(CORPUS.glob("*_gut.txt"))[:8], vocab_size=4096, out_dir=d)
        tokenizer = load_tokenizer(d)
    config = ModelConfig.preset("tiny").model_copy(update={"dim": args.dim, "n_layers": args.layers,
                                                              "n_heads": args.heads})
    records = TaskSuite(0).preference_pairs(8 * (args.steps + 5))

    def separate_loss(model, batch):
        tokens, lengths = batch
        rewards = model(tokens, lengths)
        return ranking_loss(rewards[:8], rewards[8:], torch.zeros(8)), int(lengths.sum())

    def rows(pairs):
        cols = {k: torch.from_numpy(v) for k, v in encode_pairs(tokenizer, pairs, "large", config.max_seq_len).items()}
        return [{k: v[i:i + 8] for k, v in cols.items()} for i in range(0, len(cols["tokens"]) - 7, 8)]

    grouped = TaskSuite(0).preference_pairs(32 * (args.steps + 5), per_prompt=4)
    variants = (("two_rows_per_pair", separate_rows(tokenizer, records, config.max_seq_len), separate_loss, 8),
                ("one_row_per_prompt", rows(records), reward_loss, 8),
                ("one_row_per_prompt_4_pairs", rows(grouped), reward_loss, 32))
    results = {}
    for name, batches, loss, pairs_per_step in variants:
        model = RewardModel.from_lm(Transformer(config).init_weights(seed=0))
        ms, tokens = time_steps(model, batches, loss, args.steps)
        per_1000 = ms * 1000 / pairs_per_step
        results[name] = {"ms_per_step": round(ms, 1), "ms_per_1000_pairs": round(per_1000),
                         "tokens_per_pair": round(tokens / pairs_per_step, 1)}
        print(f"{name}: {ms:.1f} ms/step, {per_1000:,.0f} ms per 1,000 pairs, {tokens / pairs_per_step:.1f} tokens per pair",
              flush=True)
    base = results["two_rows_per_pair"]["ms_per_1000_pairs"]
    for name in ("one_row_per_prompt", "one_row_per_prompt_4_pairs"):
        results[name]["speedup_per_pair"] = round(base / results[name]["ms_per_1000_pairs"], 2)
        print(f"{name}: {results[name]['speedup_per_pair']:.2f}x the pairs per second of two rows per pair")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"model": f"{args.layers} x {args.dim}", "threads": args.threads,
                                   "load_average": os.getloadavg(), **results},
                                  indent=2) + "\n")


if __name__ == "__main__":
    main()
