"""The guard (`corral.guard`) as a `TrainJob`: its records become SFT dialogs (the taxonomy and the
conversation in the prompt, the verdict as the answer) and the SFT job fine-tunes the checkpoint on
them. The held-out records come back for precision and recall once the model is exported."""

from __future__ import annotations

from pathlib import Path

from corral.config import GuardConfig
from corral.data.formats import held_out, read_all
from corral.data.tasks import UNSAFE_CATEGORIES, TaskSuite
from corral.guard import guard_sft_record
from corral.train.loop import TrainJob
from corral.train.sft import sft_job


def guard_records(cfg: GuardConfig) -> tuple[list[dict], list[dict]]:
    """(train, held-out) guard records from the configured files or the task suite's safety family."""
    if not cfg.data:
        suite = TaskSuite(cfg.tasks.seed)
        return suite.guard_examples(cfg.tasks.train_size), suite.guard_examples(cfg.tasks.eval_size, "eval")
    records = read_all(cfg.data, "guard")
    if cfg.validation_data:
        return records, read_all(cfg.validation_data, "guard")
    return held_out(records, cfg.val_fraction, cfg.loop.seed)


def guard_job(cfg: GuardConfig, base: str | Path, out: Path) -> tuple[TrainJob, dict, list[dict]]:
    """The TrainJob, its reader sources, and the held-out records to measure the guard on."""
    categories = cfg.categories or UNSAFE_CATEGORIES
    train, held = guard_records(cfg)
    unknown = sorted({c for r in train + held for c in r["categories"]} - set(categories))
    if unknown:
        raise ValueError(f"guard records name categories {unknown} that the taxonomy lacks ({', '.join(categories)}); "
                         f"add them to the guard step's `categories` (code: name)")
    dialogs = ([guard_sft_record(r, categories) for r in train], [guard_sft_record(r, categories) for r in held])
    job, datasets = sft_job(cfg, base, out, dialogs, name="guard", metadata={"guard_categories": categories})
    return job, datasets, held
