"""Data throughput: preparation tokens/s, one rank's load tokens/s and bytes read, against the
training step that consumes them.

In one process, on the same machine and cores:
  (a) `prepare_data` on a local Ray cluster over a generated corpus (JSONL documents of random
      sentences of a play's words, `corral.data.demo.synthetic_corpus`; ~10M tokens by default):
      tokens/s, from the files to the shards and manifest;
  (b) the training reader (`SequenceReader` over the memory-mapped shards) of each rank of 2,
      through one whole epoch in micro-batches of the tiny preset's training: tokens/s per rank,
      bytes read per rank and their share of the split;
  (c) the baseline: the tiny preset's bare training step (forward, backward, AdamW; bf16
      autocast, `pretrain_throughput.bare_loop`) on the same micro-batch shape, tokens/s.
The bar (issue 24): (b)/(c) >= 10, one rank's loader at least 10x faster than its training step.
Writes benchmarks/results/data_throughput.json; quote benchmarks/machine.py beside it.

    .venv/bin/python benchmarks/data_throughput.py [--words 6000000 --seq-len 256 --batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_throughput import CORPUS, bare_loop  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "data_throughput.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, default=6_000_000, help="generated corpus size (~1.6 tokens a word)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="micro-batch per rank")
    parser.add_argument("--shard-blocks", type=int, default=4096)
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="Gutenberg plays: the tokenizer and the words")
    args = parser.parse_args()

    import ray
    import torch

    from corral.config import ModelConfig, PrepareDataConfig
    from corral.data.demo import synthetic_corpus
    from corral.data.pretraining import TokenShards, prepare_pretraining_data
    from corral.data.reader import SequenceReader
    from corral.model import Transformer
    from corral.tokenizer import train_tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    result = {"words": args.words, "seq_len": args.seq_len, "micro_batch": args.batch, "world_size": 2,
              "shard_blocks": args.shard_blocks, "cores": os.cpu_count(), "load_average_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="corral-data-bench-") as tmp:
        tmp = Path(tmp)
        plays = sorted(args.corpus.glob("*_gut.txt"))[:8]
        tokenizer = train_tokenizer(plays, vocab_size=4096, out_dir=tmp / "tokenizer")
        synthetic_corpus(tmp / "corpus", plays[0].read_text(encoding="utf-8"), args.words)

        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            config = PrepareDataConfig(inputs=[str(tmp / "corpus")], seq_len=args.seq_len, val_fraction=0.01,
                                       shard_blocks=args.shard_blocks, docs_per_batch=256)
            t = time.perf_counter()
            manifest = prepare_pretraining_data(config, tmp / "data", tokenizer.path)
            prepare_s = time.perf_counter() - t
        finally:
            ray.shutdown()
        train = manifest["splits"]["train"]
        result["prepare"] = {"tokens": train["tokens"] + manifest["splits"]["validation"]["tokens"],
                             "shards": len(train["shards"]), "seconds": round(prepare_s, 1)}
        result["prepare"]["tokens_per_s"] = round(result["prepare"]["tokens"] / prepare_s)
        print(f"(a) prepare: {result['prepare']['tokens']:,} tokens in {prepare_s:.1f} s "
              f"= {result['prepare']['tokens_per_s']:,} tokens/s ({len(train['shards'])} train shards)", flush=True)

        split_bytes = sum((tmp / "data" / s["path"]).stat().st_size for s in train["shards"])
        result["load"] = []
        for rank in (0, 1):
            reader = SequenceReader(TokenShards(tmp / "data", "train"), args.batch, rank, 2, seed=0)
            steps = train["blocks"] // (2 * args.batch)
            t = time.perf_counter()
            for _ in zip(range(steps), reader):
                pass
            seconds = time.perf_counter() - t
            load = {"rank": rank, "tokens_per_s": round(reader.rows_read * args.seq_len / seconds),
                    "bytes_read": reader.bytes_read, "share_of_split_bytes": round(reader.bytes_read / split_bytes, 3)}
            result["load"].append(load)
            print(f"(b) load, rank {rank} of 2: {load['tokens_per_s']:,} tokens/s, {reader.bytes_read:,} bytes read "
                  f"= {load['share_of_split_bytes']:.1%} of the split's {split_bytes:,}", flush=True)

    model = Transformer(ModelConfig.preset("tiny")).init_weights(seed=0)
    result["train_step_tokens_per_s"] = round(bare_loop(model, 4096, args.batch, args.seq_len, steps=8, hf=False))
    print(f"(c) baseline, the tiny preset's training step: {result['train_step_tokens_per_s']:,} tokens/s")
    ratio = min(r["tokens_per_s"] for r in result["load"]) / result["train_step_tokens_per_s"]
    result["ratios"] = {"load_over_train_step (b/c, target >= 10)": round(ratio, 1)}
    result["load_average_at_end"] = os.getloadavg()[0]
    print(f"(b)/(c): one rank's loader is {ratio:,.0f}x its training step (target >= 10)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
