"""Training: the DeepSpeed strategy (the only code that calls `deepspeed.*`), the LR schedule,
the losses, and the Ray Train loop every stage shares.

The loop (and with it Ray and MLflow) loads on first use, so the strategy alone runs where
only torch and DeepSpeed are installed (benchmarks/gpu_pretrain_check.py).
"""

from corral.train.losses import causal_lm_loss, pretrain_loss
from corral.train.schedule import lr_factor
from corral.train.strategy import DeepSpeedStrategy

_LOOP = ("TrainJob", "fit", "train_worker")

__all__ = ["DeepSpeedStrategy", "causal_lm_loss", "lr_factor", "pretrain_loss", *_LOOP]


def __getattr__(name: str):
    if name in _LOOP:
        from corral.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'corral.train' has no attribute {name!r}")
