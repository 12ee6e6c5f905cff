"""Step: supervised fine-tuning of any checkpoint on dialogs (Ray Train + DeepSpeed, MLflow).

inputs: `model` (a checkpoint `corral.load_model` reads; `config.base_model` wins), and from a
pipeline `output_dir` and `run_id`. outputs: `model` (the fine-tuned corral checkpoint),
`checkpoints` (Ray Train storage), `mlflow_run_id`.

Data: SFT JSONL/Parquet files, or the synthetic task suite. Dialogs are encoded with Meta's chat
template (loss on the answers and their EOS only; Ghost Attention where marked), shuffled with
the loop's seed, and packed whole into rows of the model's context.
"""

from __future__ import annotations

import math
import os
import random
from functools import partial
from pathlib import Path

from corral.checkpoint import load_model, load_tokenizer, read_config
from corral.config import SFTConfig
from corral.data.formats import read_records
from corral.data.sft import encode_record, pack, sft_loss
from corral.data.tasks import TaskSuite
from corral.train import fit
from corral.train.loop import TrainJob
from corral.train.pretrain import export_transformer
from corral import tracking


def run(config: SFTConfig | dict, inputs: dict) -> dict:
    cfg = SFTConfig.model_validate(config)
    base = base_model_path(cfg.base_model, inputs, "sft")
    out = Path(cfg.output_dir or inputs.get("output_dir") or ".corral/runs/sft").resolve()
    model_config = read_config(base)
    tokenizer = load_tokenizer(base)
    train, val = sft_records(cfg)
    seq_len = cfg.seq_len or model_config.max_seq_len
    datasets, stats = {}, {}
    for split, records in (("train", train), ("validation", val)):
        random.Random(cfg.loop.seed).shuffle(records)
        packed = pack([encode_record(tokenizer, r, cfg.gatt) for r in records], seq_len)
        stats[f"{split}_rows"], stats[f"{split}_dropped"] = len(packed["input_ids"]), packed["dropped"]
        datasets[split] = items_dataset({k: packed[k] for k in ("input_ids", "labels", "positions")})
    loop = cfg.loop.model_copy(update={"max_steps": steps_for(cfg.epochs, stats["train_rows"], cfg)})
    job = TrainJob(
        name="sft", storage_path=str(out / "ray"), build_model=partial(load_model, base), loss_fn=sft_loss,
        loop=loop, deepspeed=cfg.deepspeed, optim=cfg.optim, resources=cfg.resources,
        export=partial(export_transformer, config=model_config, tokenizer_path=str(tokenizer.path),
                       metadata={"stage": "sft", "base_model": str(base)}),
        export_dir=str(out / "model"),
    )
    print(f"sft: {len(train)} dialogs in {stats['train_rows']} rows of {seq_len} tokens "
          f"({stats['train_dropped']} too long), {loop.max_steps} steps from {base}")
    result = run_tracked(job, datasets, cfg, inputs, out, params={"base_model": str(base), **stats})
    return {"model": job.export_dir, "checkpoints": str(Path(result.path)), "mlflow_run_id": job.mlflow_run_id}


def sft_records(cfg: SFTConfig) -> tuple[list[dict], list[dict]]:
    """(train, validation) SFT records from the configured files or the task suite."""
    if not cfg.data:
        suite = TaskSuite(cfg.tasks.seed)
        return suite.sft_dialogs(cfg.tasks.train_size), suite.sft_dialogs(cfg.tasks.eval_size, split="eval")
    records = [r for path in cfg.data for r in read_records(path, "sft")]
    if cfg.validation_data:
        return records, [r for path in cfg.validation_data for r in read_records(path, "sft")]
    return held_out(records, cfg.val_fraction, cfg.loop.seed)


# -- shared by the alignment steps (reward imports these) ------------------------------------------

def base_model_path(configured: str | None, inputs: dict, step: str) -> Path:
    path = configured or inputs.get("model")
    if path is None:
        raise ValueError(f"{step} needs a starting checkpoint: set `base_model` in its config or wire an "
                         f"upstream step that outputs `model`")
    return Path(path)


def held_out(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded random `fraction` of the records (at least one) held out."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n = max(1, round(fraction * len(records)))
    if n >= len(records):
        raise ValueError(f"{len(records)} records are too few to hold out {fraction:.0%} for validation")
    return [records[i] for i in order[n:]], [records[i] for i in order[:n]]


def steps_for(epochs: float, rows: int, cfg) -> int:
    """Optimizer steps for `epochs` passes over `rows` with the configured batch and workers."""
    per_step = cfg.loop.micro_batch_size * cfg.resources.num_workers * cfg.deepspeed.grad_accum_steps
    if rows < cfg.loop.micro_batch_size * cfg.resources.num_workers:
        raise ValueError(f"{rows} training rows are fewer than one global batch "
                         f"({cfg.loop.micro_batch_size} x {cfg.resources.num_workers} workers); add data")
    return max(1, math.ceil(epochs * rows / per_step))


def items_dataset(columns: dict):
    """A Ray Dataset with one row per index of the given equal-length numpy columns."""
    import ray.data

    n = len(next(iter(columns.values())))
    return ray.data.from_items([{k: v[i] for k, v in columns.items()} for i in range(n)])


def run_tracked(job: TrainJob, datasets: dict, cfg, inputs: dict, out: Path, params: dict,
                artifacts: dict[str, Path] | None = None):
    """fit() inside the step's MLflow run (the pipeline's, or one of its own): the resolved config,
    `params` and `artifacts` ({artifact dir: local path}) logged first, the exported model last."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    job.tracking_uri = tracking.tracking_uri(out)
    if not os.environ.get("MLFLOW_TRACKING_URI"):  # no server (unset or empty): the run's own SQLite, for
        os.environ["MLFLOW_TRACKING_URI"] = job.tracking_uri  # this process and the workers alike
    with tracking.step_run(inputs, cfg.tracking.experiment, cfg.tracking.run_name or job.name, out) as run_id:
        job.mlflow_run_id = run_id
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        params = {"max_steps_resolved": job.loop.max_steps, **params}
        tracking.log_params(run_id, cfg.model_dump(mode="json") | params)
        tracking.log_artifacts(run_id, out / "config.yaml")
        for artifact_dir, path in (artifacts or {}).items():
            tracking.log_artifacts(run_id, path, artifact_dir)
        result = fit(job, datasets)
        tracking.log_artifacts(run_id, job.export_dir, "model")
    return result
