"""Training: the DeepSpeed strategy (the only code that calls `deepspeed.*`), the LR schedule,
the losses, and the Ray Train loop every stage shares."""

from corral.train.loop import ShardStream, TrainJob, fit, train_worker
from corral.train.losses import causal_lm_loss, pretrain_loss
from corral.train.schedule import lr_factor
from corral.train.strategy import DeepSpeedStrategy

__all__ = ["DeepSpeedStrategy", "ShardStream", "TrainJob", "causal_lm_loss", "fit", "lr_factor",
           "pretrain_loss", "train_worker"]
