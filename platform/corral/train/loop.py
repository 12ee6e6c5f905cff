"""The Ray Train loop shared by every training stage: pretraining, SFT and the reward models.

A stage describes its run as a `TrainJob` (how to build the model, its loss, where the final
model goes) and calls `fit(job, datasets)`. Each Ray Train worker then runs `train_worker`:
build the model, wrap it in the DeepSpeed strategy, restore the latest checkpoint if Ray hands
one over, and loop. Exact resume comes from three pieces of state saved in every checkpoint:
the engine (model, optimizer, scheduler), the data position (`SequenceReader`) and the RNG states.

Data: each worker reads only its own rows of each global micro-batch, straight from the
prepared shards (memory-mapped) or a stage's in-memory rows (`corral.data.reader`). The data
position is (epoch, sequences consumed), identical on all ranks and independent of their
number, so a restart seeks to the next batch, on any world size, and neither repeats nor skips
one. Ray Data prepares the shards; its dynamic `streaming_split` could not promise that.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from corral import tracking
from corral.config import DeepSpeedConfig, OptimConfig, ResourcesConfig, TrainLoopConfig
from corral.data.reader import SequenceReader
from corral.model import WeightSource
from corral.train.strategy import DeepSpeedStrategy

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int]]


@dataclass
class TrainJob:
    """One training run, as the driver hands it to every worker (pickled by Ray).

    `build_model()` constructs the architecture (under ZeRO-3 inside `zero.Init`, so it must not
    touch the weights); `weights()` gives their initial values where they are read (on rank 0 only
    under ZeRO-3): a checkpoint's `WeightReader` or a `seeded_init` (see `DeepSpeedStrategy.build`). `loss_fn(model, batch)`
    returns (loss, tokens it covers). `export(tensors, dir)` runs on rank 0 at the end with the
    model's (name, tensor) pairs, which arrive one at a time as the ranks gather them.
    """

    name: str
    storage_path: str
    build_model: Callable[[], nn.Module]
    weights: Callable[[], WeightSource]
    loss_fn: LossFn
    loop: TrainLoopConfig
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    export: Callable[[Iterator[tuple[str, torch.Tensor]], Path], None] | None = None
    export_dir: str | None = None
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    params: dict = field(default_factory=dict)  # what the stage built (data sizes ...), logged to MLflow


def steps_for(epochs: float, rows: int, loop: TrainLoopConfig, resources: ResourcesConfig,
              deepspeed: DeepSpeedConfig) -> int:
    """Optimizer steps for `epochs` passes over `rows` with the configured batch and workers."""
    per_step = loop.micro_batch_size * resources.num_workers * deepspeed.grad_accum_steps
    if rows < loop.micro_batch_size * resources.num_workers:
        raise ValueError(f"{rows} training rows are fewer than one global batch "
                         f"({loop.micro_batch_size} x {resources.num_workers} workers); add data")
    return max(1, math.ceil(epochs * rows / per_step))


@dataclass
class Progress:
    """Counters that survive restarts, and the throughput/ETA line printed by rank 0."""

    step: int = 0
    tokens_seen: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]


def train_worker(config: dict) -> None:
    """Ray Train's `train_loop_per_worker`: the whole loop, on one screen."""
    import ray.train

    job: TrainJob = config["job"]
    loop = job.loop
    if job.tracking_uri:  # this process only trains: point its MLflow client at the run's server
        os.environ["MLFLOW_TRACKING_URI"] = job.tracking_uri
    torch.manual_seed(loop.seed)
    strategy = DeepSpeedStrategy(job.deepspeed, job.optim, loop.micro_batch_size, loop.max_steps)
    checkpoint = ray.train.get_checkpoint()
    opened = checkpoint.as_directory() if checkpoint is not None else nullcontext()
    with opened as resume_dir:  # a restart's weights come from the checkpoint: none are read before
        model = strategy.build(job.build_model, None if resume_dir else job.weights)
        model = strategy.prepare(model, resume_from=resume_dir)
        state = strategy.load(resume_dir) if resume_dir else None
    ctx = ray.train.get_context()
    train = SequenceReader(config["datasets"]["train"], loop.micro_batch_size, ctx.get_world_rank(),
                           ctx.get_world_size(), loop.seed)
    # The same validation batches at every evaluation, read once: losses are comparable over time.
    val_batches = SequenceReader(config["datasets"]["validation"], loop.micro_batch_size, ctx.get_world_rank(),
                                 ctx.get_world_size(), loop.seed).take(loop.eval_batches)
    progress = Progress()
    if state is not None:
        train.load_state_dict(state["data"])
        progress.load_state_dict(state["progress"])
    resumed_from, t_start = progress.step, time.perf_counter()
    # Step 0: where validation starts. On a restart: a marker of where this attempt picked up.
    start = {"val_loss": evaluate(strategy, model, job.loss_fn, val_batches)} if checkpoint is None \
        else {"resumed_from": resumed_from}
    if strategy.is_rank0() and job.mlflow_run_id:
        tracking.log_metrics(job.mlflow_run_id, start, step=resumed_from)

    batches = iter(train)
    while progress.step < loop.max_steps:
        t0, lr = time.perf_counter(), strategy.lr()  # the LR this step uses
        strategy.train()
        losses, tokens = [], 0
        for _ in range(job.deepspeed.grad_accum_steps):
            loss, n = job.loss_fn(model, next(batches))
            strategy.backward(loss)
            strategy.step()  # steps the optimizer and schedule only at the accumulation boundary
            losses.append(loss.detach())
            tokens += n * ctx.get_world_size()
        progress.step, progress.tokens_seen = progress.step + 1, progress.tokens_seen + tokens

        metrics = {}
        if progress.step % loop.log_every == 0 or progress.step == loop.max_steps:
            loss = strategy.all_reduce_mean(torch.stack(losses).mean()).item()  # sync: the mean over ranks
            elapsed = time.perf_counter() - t0
            metrics = {"loss": loss, "lr": lr, "grad_norm": strategy.grad_norm(),
                       "tokens_per_s": tokens / elapsed, "tokens_seen": progress.tokens_seen}
        if progress.step % loop.eval_every == 0 or progress.step == loop.max_steps:
            val_loss = evaluate(strategy, model, job.loss_fn, val_batches)
            metrics |= {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0))}
        if metrics and strategy.is_rank0():
            report_progress(job, progress, metrics, resumed_from, time.perf_counter() - t_start)
        if progress.step % loop.checkpoint_every == 0 or progress.step == loop.max_steps:
            save_checkpoint(strategy, train, progress, metrics | {"resumed_from": resumed_from})

    batches.close()
    report_data_read(job, strategy, train, progress.step)
    if job.export is not None:
        tensors = strategy.gathered_parameters()  # collective: every rank takes part in each gather
        if strategy.is_rank0():
            job.export(tensors, Path(job.export_dir))
        else:
            deque(tensors, maxlen=0)
    strategy.barrier()
    if strategy.is_rank0():  # metrics an MLflow outage held back: sent before the worker exits
        tracking.flush()


@torch.no_grad()
def evaluate(strategy: DeepSpeedStrategy, model: nn.Module, loss_fn: LossFn, batches: list) -> float:
    """Mean loss over the validation batches, averaged over ranks (all ranks must call it)."""
    strategy.train(False)
    losses = torch.stack([loss_fn(model, batch)[0] for batch in batches])
    strategy.train(True)
    return strategy.all_reduce_mean(losses.mean()).item()  # sync: read on the host


def save_checkpoint(strategy: DeepSpeedStrategy, train: SequenceReader, progress: Progress, metrics: dict) -> None:
    """Every rank writes its shard to a local directory; Ray merges them into one checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="corral-ckpt-") as d:
        strategy.save(d, {"data": train.state_dict(), "progress": progress.state_dict()})
        ray.train.report({"step": progress.step, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"step_{progress.step:08d}")


def report_data_read(job: TrainJob, strategy: DeepSpeedStrategy, train: SequenceReader, step: int) -> None:
    """What each rank read of the training data in this attempt, gathered once at the end (not per
    batch) and logged by rank 0: `data_rows_read_rank{r}` and `data_bytes_read_rank{r}`."""
    import torch.distributed as dist

    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, (train.rows_read, train.bytes_read))  # collective: every rank calls it
    if strategy.is_rank0() and job.mlflow_run_id:
        metrics = {f"data_{kind}_read_rank{r}": n for r, c in enumerate(counts) for kind, n in zip(("rows", "bytes"), c)}
        tracking.log_metrics(job.mlflow_run_id, metrics, step=step)


def report_progress(job: TrainJob, progress: Progress, metrics: dict, resumed_from: int, elapsed: float) -> None:
    """Rank 0 only: one MLflow batch and one progress line with the ETA."""
    if job.mlflow_run_id:
        tracking.log_metrics(job.mlflow_run_id, metrics, step=progress.step)
    done = progress.step - resumed_from
    eta = elapsed / max(done, 1) * (job.loop.max_steps - progress.step)
    line = f"step {progress.step}/{job.loop.max_steps} loss {metrics.get('loss', float('nan')):.4f}"
    if "tokens_per_s" in metrics:
        line += f" tok/s {metrics['tokens_per_s']:,.0f}"
    if "val_loss" in metrics:
        line += f" val_loss {metrics['val_loss']:.4f}"
    # Not print(): Ray Train patches it in workers and, once anything has wrapped sys.stderr,
    # the line comes out twice (tee to the stream plus the root logger's console handler).
    sys.stderr.write(f"{line} eta {time.strftime('%H:%M:%S', time.gmtime(eta))}\n")
    sys.stderr.flush()


def fit(job: TrainJob, datasets: dict):
    """Run `job` on a Ray Train TorchTrainer; resumes from the run's latest checkpoint if there is one.

    `datasets`: "train" and "validation" reader sources (`TokenShards`, `ColumnRows`); each worker
    reads its own rows of them. Re-running with the same `name` and `storage_path` continues a
    finished or failed run.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.placement_group import remove_placement_group

    from corral.placement import bundle, reserve

    r = job.resources
    workers = bundle(r.cpus_per_worker, r.gpus_per_worker, r.accelerator_type)
    # Ray Train waits for its workers' resources without end; fail instead, saying what did not fit
    remove_placement_group(reserve([workers] * r.num_workers, "PACK", r.placement_timeout_s, f"training {job.name}",
                                   "Lower resources.num_workers/cpus_per_worker/gpus_per_worker, or add nodes."))
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job, "datasets": datasets},
        scaling_config=ScalingConfig(
            num_workers=r.num_workers, use_gpu=r.gpus_per_worker > 0, accelerator_type=r.accelerator_type,
            resources_per_worker={"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})},
        ),
        run_config=RunConfig(
            name=job.name, storage_path=str(Path(job.storage_path).resolve()),
            failure_config=FailureConfig(max_failures=job.loop.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    return trainer.fit()
