"""Step: corpus files -> packed token blocks (train / validation) + manifest, on Ray Data.

inputs: `tokenizer` (a directory or tokenizer.model; `config.tokenizer` wins).
outputs: `data` (the prepared directory, what pretrain reads) and `manifest`.
In a pipeline the manifest's counts (tokens, documents and skips, personal information replaced
by kind, duplicates dropped and the share of tokens they held) go to the step's MLflow run as
metrics, the sample of replacements as an artifact.
"""

from __future__ import annotations

from pathlib import Path

from corral import tracking
from corral.config import PrepareDataConfig
from corral.data.pretraining import MANIFEST, PII_SAMPLES_FILE, prepare_pretraining_data
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
          f"-> {out}; documents: {manifest['documents']}")
    if inputs.get("run_id"):
        tracking.log_metrics(inputs["run_id"], manifest_metrics(manifest), step=0)
        if manifest["pii"] is not None:
            tracking.log_artifacts(inputs["run_id"], Path(out) / PII_SAMPLES_FILE)
    return {"data": str(Path(out)), "manifest": str(Path(out) / MANIFEST)}


def manifest_metrics(manifest: dict) -> dict[str, float]:
    """The manifest's counts as flat MLflow metrics: `train_tokens`, `documents`, `skipped_*` (with
    `skipped_exact_duplicate`, `skipped_near_duplicate`), `dropped_tokens`, `pii_<kind>`,
    `dedup_tokens_removed` and `dedup_tokens_removed_share`."""
    metrics = {f"{split}_{k}": v[k] for split, v in manifest["splits"].items() for k in ("tokens", "blocks")}
    metrics |= manifest["documents"] | {"dropped_tokens": manifest["dropped_tokens"]}
    if manifest.get("dedup"):
        metrics |= {f"dedup_{k}": manifest["dedup"][k] for k in ("tokens_removed", "tokens_removed_share")}
    return metrics | {f"pii_{k}": n for k, n in (manifest["pii"] or {}).items()}
