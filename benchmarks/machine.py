"""How fast this machine's CPU multiplies matrices, to put the pipeline's timings in context.

The bars of the alignment issues are wall-clock minutes on a 2-core machine, but the machines this
project runs on are not all alike: DESIGN.md measured fp32 ~170 and bf16 ~700 GFLOP/s on its
development machine (a CPU with AVX-512 bf16), and some days the same sandbox ran on a CPU with only
AVX2, where fp32 ran 139 GFLOP/s and bf16, with no fast path, 0.8. Run this beside a timing and
quote both. Writes benchmarks/results/machine.json.

    .venv/bin/python benchmarks/machine.py [--threads 2 --size 1024 --seconds 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from corral.train.strategy import cpu_flags

RESULTS = Path(__file__).resolve().parent / "results" / "machine.json"


def gflops(dtype: torch.dtype, size: int, seconds: float) -> float:
    """Best of several timed runs of `size` x `size` matmuls, in GFLOP/s."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b  # warm-up: thread pool, kernel selection
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        n, t = 0, time.perf_counter()
        while n < 4 or time.perf_counter() - t < 0.2:
            a @ b
            n += 1
        best = max(best, 2 * size ** 3 * n / (time.perf_counter() - t) / 1e9)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=3.0, help="per dtype")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    simd = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma")))
    result = {"threads": args.threads, "size": args.size, "cpu": platform.processor() or platform.machine(),
              "simd": simd, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        result[f"{name}_gflops"] = round(gflops(dtype, args.size, args.seconds), 1)
        print(f"{name}: {result[f'{name}_gflops']:,.1f} GFLOP/s ({args.threads} threads, {args.size}^2 matmul)",
              flush=True)
    result["bf16_over_fp32"] = round(result["bf16_gflops"] / result["fp32_gflops"], 3)
    print(f"bf16 / fp32: {result['bf16_over_fp32']:.2f} (DESIGN.md's development machine: ~4); "
          f"fp32 against its ~170 GFLOP/s: {result['fp32_gflops'] / 170:.2f}")
    print(f"SIMD: {' '.join(result['simd']) or 'unknown'}; torch uses {result['torch_cpu_capability']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
