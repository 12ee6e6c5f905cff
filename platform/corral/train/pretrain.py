"""Pretraining as a `TrainJob`: a freshly initialised Transformer, next-token loss on packed blocks
(`corral.data.pretraining` prepares them; `corral.train.losses.pretrain_loss`)."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch

from corral.checkpoint import write_checkpoint
from corral.config import DeepSpeedConfig, ModelConfig, PretrainConfig
from corral.data.pretraining import CorpusError, load_packed, read_manifest
from corral.model import Transformer, seeded_init
from corral.tokenizer import Tokenizer
from corral.train.loop import TrainJob
from corral.train.losses import pretrain_loss


def export_model(tensors: Iterator[tuple[str, torch.Tensor]], out_dir: Path, config: ModelConfig, tokenizer_path: str,
                 metadata: dict, dtype: torch.dtype, shard_bytes: int, head: str = "lm") -> None:
    """Rank 0: the trained model, streamed in as the ranks gather it, as sharded safetensors in
    the training dtype (`corral.checkpoint.write_checkpoint`), written atomically."""
    write_checkpoint(out_dir, config, tensors, head=head, tokenizer=Tokenizer(tokenizer_path), metadata=metadata,
                     dtype=dtype, shard_bytes=shard_bytes)


def training_dtype(ds: DeepSpeedConfig) -> torch.dtype:
    """What a stage's model is exported in: bf16 when it trained in bf16, else fp32."""
    return torch.bfloat16 if ds.bf16 else torch.float32


def check_data(cfg: PretrainConfig, data_dir: str | Path) -> dict:
    """Fail before any worker starts if the prepared data cannot feed this model."""
    manifest = read_manifest(data_dir)
    model = cfg.model_config_resolved()
    if manifest["vocab_size"] > model.vocab_size:
        raise CorpusError(f"{data_dir} was tokenised with {manifest['vocab_size']} pieces but the model has "
                          f"vocab_size {model.vocab_size}; use a matching tokenizer or model")
    if manifest["seq_len"] > model.max_seq_len:
        raise CorpusError(f"{data_dir} packs {manifest['seq_len']}-token sequences, longer than the model's "
                          f"max_seq_len {model.max_seq_len}; prepare the data with seq_len <= {model.max_seq_len}")
    global_batch = cfg.loop.micro_batch_size * cfg.resources.num_workers
    for split in ("train", "validation"):
        if manifest["splits"][split]["blocks"] < global_batch:
            raise CorpusError(f"{data_dir} has {manifest['splits'][split]['blocks']} {split} blocks, fewer than "
                              f"one global batch ({global_batch}); add text or lower micro_batch_size")
    return manifest


def pretrain_job(cfg: PretrainConfig, data_dir: str | Path, out: Path) -> tuple[TrainJob, dict]:
    """The TrainJob and the Ray datasets of a pretraining run into `out / "model"`; checks the data
    before any worker starts."""
    model = cfg.model_config_resolved()
    manifest = check_data(cfg, data_dir)
    job = TrainJob(
        name="pretrain", storage_path=str(out / "ray"),
        build_model=partial(Transformer, model), weights=partial(seeded_init, cfg.loop.seed),
        loss_fn=pretrain_loss, loop=cfg.loop, deepspeed=cfg.deepspeed, optim=cfg.optim, resources=cfg.resources,
        export=partial(export_model, config=model, tokenizer_path=str(Path(data_dir) / "tokenizer.model"),
                       metadata={"stage": "pretrain", "tokenizer_sha256": manifest["tokenizer_sha256"]},
                       dtype=training_dtype(cfg.deepspeed),
                       shard_bytes=cfg.loop.export_shard_mb * 2**20),
        export_dir=str(out / "model"), params={"data_dir": str(data_dir)},
    )
    return job, {split: load_packed(data_dir, split) for split in ("train", "validation")}
