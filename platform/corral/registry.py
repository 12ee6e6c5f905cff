"""Where a model to load lives: a local checkpoint directory or an MLflow registry URI.

`models:/NAME@ALIAS` (or `models:/NAME/VERSION`) is downloaded from the tracking server named by
MLFLOW_TRACKING_URI into a local directory; the checkpoint is that directory or the one
checkpoint directory inside it (registered versions usually point at a run's `checkpoint/`).
"""

from __future__ import annotations

import os
from pathlib import Path

from corral.checkpoint import CheckpointError, detect_format

CHECKPOINT_MARKERS = ("corral.json", "config.json", "params.json")


def resolve_model(source: str | os.PathLike, dst: str | os.PathLike | None = None) -> Path:
    """A local checkpoint directory for a path or a `models:/` URI (downloaded into `dst`)."""
    source = str(source)
    if source.startswith("models:/"):
        import mlflow

        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=dst and str(dst)))
        except Exception as e:  # mlflow raises MlflowException and OSError subclasses alike
            raise CheckpointError(
                f"cannot download {source} from the MLflow registry at "
                f"{os.environ.get('MLFLOW_TRACKING_URI', '(MLFLOW_TRACKING_URI unset)')}: {e}"
            ) from e
        return _find_checkpoint(local, source)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"model {source} is neither an existing path nor a models:/NAME@ALIAS URI")
    return _find_checkpoint(path, source)


def _find_checkpoint(root: Path, source: str) -> Path:
    if any((root / m).is_file() for m in CHECKPOINT_MARKERS):
        detect_format(root)
        return root
    found = sorted({p.parent for m in CHECKPOINT_MARKERS for p in root.rglob(m)})
    if len(found) != 1:
        raise CheckpointError(f"{source}: expected one checkpoint directory under {root}, found {len(found)}")
    detect_format(found[0])
    return found[0]
