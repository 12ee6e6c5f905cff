"""GPU check: train the `small` preset for ~30 steps on random tokens with corral's DeepSpeed
strategy (ZeRO-3, bf16, world size 1) in one process; print tokens/s and MFU against a bf16
matmul peak measured here.

Needs torch, deepspeed and corral's own light dependencies (pydantic, numpy, safetensors,
sentencepiece); not Ray, not MLflow. On a GPU box:

    python benchmarks/gpu_pretrain_check.py                      # cuda, 30 steps
    python benchmarks/gpu_pretrain_check.py --device cpu --steps 3 --batch 2 --seq-len 128   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def matmul_peak(device: str, n: int, repeats: int = 10) -> float:
    """Achieved bf16 matmul FLOP/s on an n x n x n product: the MFU denominator."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def train_steps(strategy, model, vocab: int, batch: int, seq_len: int, steps: int, device: str) -> tuple[float, list]:
    """Train `steps` steps on random tokens; (median tokens/s after the warm-up steps, losses)."""
    import torch

    from corral.train.losses import pretrain_loss

    gen = torch.Generator().manual_seed(0)
    times, losses = [], []
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (batch, seq_len + 1), generator=gen)
        sync(device)
        t = time.perf_counter()
        loss, _ = pretrain_loss(model, {"tokens": tokens.to(strategy.device)})
        strategy.backward(loss)
        strategy.step()
        losses.append(loss.item())  # host-device sync: the step is done
        times.append(time.perf_counter() - t)
    steady = times[min(3, len(times) - 1):]  # the first steps allocate and warm up kernels
    return batch * seq_len / statistics.median(steady), losses


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (parameters in matmuls) + attention scores (PaLM appendix B)."""
    matmul_params = config.num_params() - config.vocab_size * config.dim  # the embedding is a lookup
    return 6 * matmul_params + 12 * config.n_layers * config.dim * seq_len


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--zero-stage", type=int, default=3)
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is imported: no CUDA even if present

    import torch

    from corral.config import DeepSpeedConfig, ModelConfig, OptimConfig
    from corral.model import Transformer
    from corral.train.strategy import DeepSpeedStrategy

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu for the smoke check")
    config = ModelConfig.preset(args.preset)
    strategy = DeepSpeedStrategy(DeepSpeedConfig(zero_stage=args.zero_stage, bf16=True),
                                 OptimConfig(lr=3e-4, warmup_steps=max(1, args.steps // 10)),
                                 micro_batch_size=args.batch, max_steps=args.steps)
    model = strategy.prepare(Transformer(config).init_weights(seed=0))  # initialises torch.distributed
    tokens_per_s, losses = train_steps(strategy, model, config.vocab_size, args.batch, args.seq_len, args.steps,
                                       args.device)
    peak = matmul_peak(args.device, 8192 if args.device == "cuda" else 1024)
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "preset": args.preset, "params": config.num_params(), "batch": args.batch, "seq_len": args.seq_len,
        "zero_stage": args.zero_stage, "steps": args.steps, "tokens_per_s": round(tokens_per_s, 1),
        "bf16_matmul_peak_tflops": round(peak / 1e12, 3),
        "mfu": round(flops_per_token(config, args.seq_len) * tokens_per_s / peak, 4),
        "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
