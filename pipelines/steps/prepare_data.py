"""Step: corpus files -> packed token blocks (train / validation) + manifest, on Ray Data.

inputs: `tokenizer` (a directory or tokenizer.model; `config.tokenizer` wins) and, when
`config.output_dir` is unset, `output_dir` (the pipeline's directory for this step).
outputs: `data` (the prepared directory, what pretrain reads) and `manifest`.
"""

from __future__ import annotations

from pathlib import Path

from corral.config import PrepareDataConfig
from corral.data.pretraining import MANIFEST, prepare_pretraining_data


def run(config: PrepareDataConfig | dict, inputs: dict) -> dict:
    cfg = PrepareDataConfig.model_validate(config)
    tokenizer_path = cfg.tokenizer or inputs.get("tokenizer")
    out = cfg.output_dir or inputs.get("output_dir")
    if tokenizer_path is None or out is None:
        raise ValueError("prepare_data needs a tokenizer and an output directory: set `tokenizer` and "
                         "`output_dir` in its config, or wire them from upstream steps")
    manifest = prepare_pretraining_data(cfg, out, tokenizer_path)
    splits = manifest["splits"]
    print(f"prepared {splits['train']['tokens']:,} train / {splits['validation']['tokens']:,} validation tokens "
          f"-> {out}; skipped: {manifest['documents']}")
    return {"data": str(Path(out)), "manifest": str(Path(out) / MANIFEST)}
