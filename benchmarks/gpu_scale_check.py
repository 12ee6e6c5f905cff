"""GPU check for training at scale: a ~1B-parameter Llama 2 on one GPU, built the way the 7B-70B
specs build it (ZeRO-3 with `zero.Init`, bf16, activation checkpointing), trained for a few dozen
steps on random tokens. Prints tokens/s, MFU against a bf16 matmul peak measured here, and the
peak GPU memory against `corral plan`'s prediction for the same shape (target: within 15 %).
Writes benchmarks/results/gpu_scale.json.

Needs torch, deepspeed and corral's light dependencies (pydantic, numpy, safetensors,
sentencepiece); not Ray, not MLflow. On a GPU machine:

    python benchmarks/gpu_scale_check.py                    # ~1B, seq 2048, micro-batch 4, H100
    python benchmarks/gpu_scale_check.py --device cpu --preset small --seq-len 128 --batch 2 --steps 3  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
from functools import partial
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_scale.json"
ONE_B = dict(dim=2048, n_layers=16, n_heads=16, vocab_size=32000, max_seq_len=2048)  # 0.95B parameters


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--preset", default="1b", help="'1b' (this script's ~1B shape) or a corral preset")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4, help="micro-batch: sequences per step")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--accelerator", default="H100", help="the plan's accelerator type for the prediction")
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is imported: no CUDA even if present

    import torch

    from corral.config import DeepSpeedConfig, ModelConfig, OptimConfig, PretrainConfig
    from corral.model import Transformer, seeded_init
    from corral.plan import plan_step
    from corral.train.strategy import DeepSpeedStrategy
    from gpu_pretrain_check import flops_per_token, matmul_peak, train_steps

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu for the smoke check")
    config = ModelConfig(**ONE_B) if args.preset == "1b" else ModelConfig.preset(args.preset)
    config = config.model_copy(update={"max_seq_len": max(config.max_seq_len, args.seq_len)})
    ds = DeepSpeedConfig(zero_stage=3, bf16=True, activation_checkpointing=True)
    strategy = DeepSpeedStrategy(ds, OptimConfig(lr=3e-4, warmup_steps=max(1, args.steps // 10)),
                                 micro_batch_size=args.batch, max_steps=args.steps)
    model = strategy.prepare(strategy.build(partial(Transformer, config), partial(seeded_init, 0)))
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens_per_s, losses = train_steps(strategy, model, config.vocab_size, args.batch, args.seq_len, args.steps,
                                       args.device)
    peak = matmul_peak(args.device, 8192 if args.device == "cuda" else 1024)

    cfg = PretrainConfig(model=config.model_dump(), data_dir="unused", deepspeed=ds.model_dump(),
                         loop={"micro_batch_size": args.batch},
                         resources={"num_workers": 1, "gpus_per_worker": 1, "accelerator_type": args.accelerator})
    plan = plan_step("pretrain", "pretrain", cfg, config.model_copy(update={"max_seq_len": args.seq_len}))
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "params": config.num_params(), "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps,
        "tokens_per_s": round(tokens_per_s, 1), "bf16_matmul_peak_tflops": round(peak / 1e12, 3),
        "mfu": round(flops_per_token(config, args.seq_len) * tokens_per_s / peak, 4),
        "mfu_with_recompute": round(flops_per_token(config, args.seq_len) * 4 / 3 * tokens_per_s / peak, 4),
        "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
        "plan_per_accelerator_gb": round(plan.per_accelerator_bytes / 1e9, 2),
    }
    if args.device == "cuda":
        measured = torch.cuda.max_memory_allocated()
        result |= {"peak_allocated_gb": round(measured / 1e9, 2),
                   "measured_over_plan": round(measured / plan.per_accelerator_bytes, 3)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda":  # a CPU smoke run does not overwrite a GPU result
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
