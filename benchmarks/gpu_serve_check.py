"""GPU check of corral's generation engine: throughput and time to first token at concurrency 1 and 32.

Standalone on purpose: no Ray, no MLflow, no Serve. It needs only torch, pydantic, sentencepiece
and safetensors (what `corral.engine` imports) and runs from a checkout:

    python benchmarks/gpu_serve_check.py                    # small preset, random weights, CUDA, bf16
    python benchmarks/gpu_serve_check.py --device cpu       # quick smoke check (fp32)

It builds the `small` preset with random weights, streams N concurrent requests of random prompt
tokens through `corral.engine.Engine` (the engine Serve and RLHF use) and prints one JSON object:
per concurrency the output tokens/s and TTFT p50/p99, and whether each request's greedy tokens at
concurrency 32 equal its tokens alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def run(engine, prompts: list[list[int]], params) -> tuple[list[list[int]], dict]:
    """All prompts at once through the streaming API: their tokens, throughput and TTFT."""
    async def one(prompt):
        start, ttft, tokens = time.perf_counter(), None, []
        async for out in engine.stream(prompt, params):
            ttft = ttft if ttft is not None else time.perf_counter() - start
            tokens += out.token_ids
        return tokens, ttft

    start = time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - start
    ttfts = [ttft for _, ttft in results]
    n_tokens = sum(len(t) for t, _ in results)
    return [t for t, _ in results], {"concurrency": len(prompts), "output_tokens": n_tokens, "wall_s": round(wall, 3),
                                     "output_tokens_per_s": round(n_tokens / wall, 1),
                                     "ttft_p50_ms": round(1e3 * percentile(ttfts, 50), 2),
                                     "ttft_p99_ms": round(1e3 * percentile(ttfts, 99), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--preset", default="small")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--no-batch-invariant", action="store_true", help="skip the per-row decode measures")
    args = p.parse_args()

    from corral.config import ModelConfig
    from corral.engine import Engine, SamplingParams
    from corral.model import Transformer

    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    config = ModelConfig.preset(args.preset)
    model = Transformer(config).init_weights(seed=0).to(device=args.device, dtype=dtype).eval()
    engine = Engine(model, max_batch_size=max(args.concurrency), batch_invariant=not args.no_batch_invariant)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, stop_token_ids=[])
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, config.vocab_size, (max(args.concurrency), args.prompt_tokens), generator=g).tolist()

    asyncio.run(run(engine, prompts[:2], params.model_copy(update={"max_tokens": 8})))  # warm-up
    report = {"device": str(torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device),
              "dtype": str(dtype), "preset": args.preset, "params": config.num_params(),
              "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
              "batch_invariant": engine.batch_invariant, "runs": []}
    alone = None
    for c in args.concurrency:
        tokens, stats = asyncio.run(run(engine, prompts[:c], params))
        if c == 1:
            alone = tokens[0]
        elif alone is not None:
            stats["greedy_tokens_equal_alone"] = tokens[0] == alone
        report["runs"].append(stats)
    engine.close()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
