"""Step: corpus files -> packed token blocks (train / validation) + manifest, on Ray Data.

inputs: `tokenizer` (a directory or tokenizer.model; `config.tokenizer` wins).
outputs: `data` (the prepared directory, what pretrain reads) and `manifest`.
"""

from __future__ import annotations

from pathlib import Path

from corral.config import PrepareDataConfig
from corral.data.pretraining import MANIFEST, prepare_pretraining_data
from pipelines.steps.common import output_dir


def run(config: PrepareDataConfig | dict, inputs: dict) -> dict:
    cfg = PrepareDataConfig.model_validate(config)
    tokenizer_path = cfg.tokenizer or inputs.get("tokenizer")
    if tokenizer_path is None:
        raise ValueError("prepare_data needs a tokenizer: set `tokenizer` in its config or wire the tokenizer step")
    out = output_dir(cfg.output_dir, inputs, "prepare_data")
    manifest = prepare_pretraining_data(cfg, out, tokenizer_path)
    splits = manifest["splits"]
    print(f"prepared {splits['train']['tokens']:,} train / {splits['validation']['tokens']:,} validation tokens "
          f"-> {out}; skipped: {manifest['documents']}")
    return {"data": str(Path(out)), "manifest": str(Path(out) / MANIFEST)}
