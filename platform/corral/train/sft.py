"""Supervised fine-tuning as a `TrainJob` (Llama 2, section 3.1).

Data: SFT JSONL/Parquet files, or the synthetic task suite. Dialogs are encoded with Meta's chat
template (`corral.data.sft`: loss on the answers and their EOS only, Ghost Attention where
marked), shuffled with the loop's seed, and packed whole into rows of the model's context. The
loss is `corral.train.losses.sft_loss`; the model starts from any checkpoint `load_model` reads (read tensor by tensor).
"""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path

from corral.checkpoint import WeightReader, load_tokenizer, read_config
from corral.config import SFTConfig
from corral.data.formats import held_out, read_all
from corral.data.reader import ColumnRows
from corral.data.sft import encode_record, pack
from corral.data.tasks import TaskSuite
from corral.train.loop import TrainJob, steps_for
from corral.train.losses import sft_loss
from corral.model import Transformer
from corral.train.pretrain import export_model, training_dtype


def sft_records(cfg: SFTConfig) -> tuple[list[dict], list[dict]]:
    """(train, validation) SFT records from the configured files or the task suite."""
    if not cfg.data:
        suite = TaskSuite(cfg.tasks.seed)
        return suite.sft_dialogs(cfg.tasks.train_size), suite.sft_dialogs(cfg.tasks.eval_size, split="eval")
    records = read_all(cfg.data, "sft")
    if cfg.validation_data:
        return records, read_all(cfg.validation_data, "sft")
    return held_out(records, cfg.val_fraction, cfg.loop.seed)


def sft_job(cfg: SFTConfig, base: str | Path, out: Path, records: tuple[list[dict], list[dict]] | None = None,
            name: str = "sft", metadata: dict | None = None) -> tuple[TrainJob, dict]:
    """The TrainJob and the reader sources (packed rows) that fine-tune `base` into `out / "model"`,
    on `records` ((train, validation) SFT records) if given, else on `sft_records(cfg)`."""
    model_config, tokenizer = read_config(base), load_tokenizer(base)
    train, val = records or sft_records(cfg)
    seq_len = cfg.seq_len or model_config.max_seq_len
    datasets, stats = {}, {}
    for split, records in (("train", train), ("validation", val)):
        random.Random(cfg.loop.seed).shuffle(records)
        packed = pack([encode_record(tokenizer, r, cfg.gatt) for r in records], seq_len)
        stats[f"{split}_rows"], stats[f"{split}_dropped"] = len(packed["input_ids"]), packed["dropped"]
        datasets[split] = ColumnRows({k: packed[k] for k in ("input_ids", "labels", "positions")})
    loop = cfg.loop.model_copy(update={"max_steps": steps_for(cfg.epochs, stats["train_rows"], cfg.loop,
                                                               cfg.resources, cfg.deepspeed)})
    job = TrainJob(
        name=name, storage_path=str(out / "ray"), build_model=partial(Transformer, model_config),
        weights=partial(WeightReader, base), loss_fn=sft_loss,
        loop=loop, deepspeed=cfg.deepspeed, optim=cfg.optim, resources=cfg.resources,
        export=partial(export_model, config=model_config, tokenizer_path=str(tokenizer.path),
                       metadata={"stage": name, "base_model": str(base), **(metadata or {})}, dtype=training_dtype(cfg.deepspeed),
                       shard_bytes=cfg.loop.export_shard_mb * 2**20),
        export_dir=str(out / "model"), params={"base_model": str(base), **stats},
    )
    print(f"{name}: {len(train)} dialogs in {stats['train_rows']} rows of {seq_len} tokens "
          f"({stats['train_dropped']} too long), {loop.max_steps} steps from {base}")
    return job, datasets
