"""GPU check for RLHF: the PPO step on the `small` preset for 5 iterations on one GPU with corral's
engine, every role (policy, critic, reference and the two reward models) on that GPU, a fifth of it
each; prints each iteration's time split into rollout (sampling and reward scoring), log-probs and
values, and update.

It runs the step itself (`pipelines.steps.ppo`), so it needs Ray and the project's dependencies;
without MLFLOW_TRACKING_URI it logs to a SQLite file beside its models (a temporary directory).
Random weights and a tokenizer trained on the task suite's dialogs: this times the machinery, it
aligns nothing.

    python benchmarks/gpu_rlhf_check.py                                                   # cuda
    python benchmarks/gpu_rlhf_check.py --device cpu --preset tiny --iterations 2 --rollouts 8   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `pipelines` when run as a script
VOCAB = 1024  # what the task suite's dialogs support (SentencePiece refuses more pieces than they hold)


def models(root: Path, preset: str) -> dict[str, str]:
    """A policy with random weights and two reward models started from it, with a tokenizer."""
    import corral
    from corral.config import ModelConfig
    from corral.data.tasks import TaskSuite
    from corral.model import Transformer
    from corral.reward import RewardModel, save_reward_model
    from corral.tokenizer import train_tokenizer

    texts = (turn["content"] for dialog in TaskSuite(0).sft_dialogs(4000) for turn in dialog["messages"])
    tokenizer = train_tokenizer(vocab_size=VOCAB, out_dir=root / "tokenizer", texts=texts)
    lm = Transformer(ModelConfig.preset(preset).model_copy(update={"vocab_size": VOCAB})).init_weights(seed=0)
    paths = {"policy": str(corral.save_model(lm, root / "policy", tokenizer))}
    for kind in ("helpful", "safety"):
        rm = RewardModel.from_lm(lm)
        rm.tokenizer = tokenizer
        paths[kind] = str(save_reward_model(rm, root / kind))
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--preset", default="small")
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--rollouts", type=int, default=64, help="prompts sampled per iteration")
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args()

    import ray
    import torch

    from corral import tracking
    from pipelines.steps import ppo

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu for a smoke test")
    root = Path(tempfile.mkdtemp(prefix="rlhf-check-"))
    if not os.environ.get("MLFLOW_TRACKING_URI"):  # a SQLite file of its own, not the checkout's
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    paths = models(root, args.preset)
    ray.init(address="local", num_gpus=1 if cuda else 0, include_dashboard=False)  # its own, not a running one
    config = {
        "policy": paths["policy"], "helpful_reward": paths["helpful"], "safety_reward": paths["safety"],
        "prompts": {"n_train": args.rollouts, "n_eval": 0}, "iterations": args.iterations,
        "rollout_batch_size": args.rollouts, "minibatch_size": min(16, args.rollouts),
        "max_new_tokens": args.max_new_tokens, "max_kl": 1e9, "output_dir": str(root / "out"),
        "deepspeed": {"zero_stage": 3, "bf16": cuda},
        "resources": {"cpus_per_role": 1 if cuda else 0.25, "gpus_per_role": 0.2 if cuda else 0, "call_timeout_s": 600},
        "tracking": {"experiment": "gpu-rlhf-check"},
    }
    start = time.perf_counter()
    out = ppo.run(config, {})
    wall = time.perf_counter() - start
    split = {key: [v for _, v in tracking.metric_history(out["mlflow_run_id"], f"time_{key}_s")]
             for key in ("rollout", "logprobs", "update")}
    print(f"{'iteration':>9} {'rollout s':>10} {'logprobs s':>11} {'update s':>9}")
    for i, (r, lp, u) in enumerate(zip(*split.values())):
        print(f"{i:>9} {r:>10.2f} {lp:>11.2f} {u:>9.2f}")
    print(json.dumps({"device": torch.cuda.get_device_name(0) if cuda else "cpu", "preset": args.preset,
                      "rollouts": args.rollouts, "max_new_tokens": args.max_new_tokens, "step_wall_s": round(wall, 1),
                      "split_s": split}))
    ray.shutdown()


if __name__ == "__main__":
    main()
