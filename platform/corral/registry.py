"""Where a model to load lives: a local checkpoint directory or an MLflow registry URI.

`models:/NAME@ALIAS` names whatever version the alias points at now; `pin_version` turns it into
that `models:/NAME/VERSION`, so a deployment resolves it once and every replica serves the same
version however the alias moves later. A version is downloaded from the tracking server named by
MLFLOW_TRACKING_URI once per machine, into a cache keyed by server, name and version
($CORRAL_MODEL_CACHE, default ~/.cache/corral/models), atomically: a replica that finds it there
fetches nothing. Only what is served is fetched: a corral checkpoint's files, not the Hugging
Face export (`hf/`) the register step puts beside them. The checkpoint is that directory or the
one checkpoint directory inside it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from corral.checkpoint import CheckpointError, detect_format

CHECKPOINT_MARKERS = ("corral.json", "config.json", "params.json")


def pin_version(source: str) -> str:
    """`models:/NAME@ALIAS` as `models:/NAME/VERSION` of the version the alias names now; any other
    source as it is."""
    if not source.startswith("models:/") or "@" not in source:
        return source
    name, alias = source.removeprefix("models:/").split("@", 1)
    try:
        version = _client().get_model_version_by_alias(name, alias).version
    except Exception as e:  # MlflowException for an unknown name or alias, OSError for no server
        raise CheckpointError(f"cannot resolve {source} in the MLflow registry at {_tracking_uri()}: {e}") from e
    return f"models:/{name}/{version}"


def resolve_model(source: str | os.PathLike) -> Path:
    """A local checkpoint directory for a path or a `models:/` URI (fetched into the cache once)."""
    source = str(source)
    if source.startswith("models:/"):
        return _find_checkpoint(_cached_version(pin_version(source)), source)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"model {source} is neither an existing path nor a models:/NAME@ALIAS URI")
    return _find_checkpoint(path, source)


def model_cache() -> Path:
    return Path(os.environ.get("CORRAL_MODEL_CACHE") or Path.home() / ".cache" / "corral" / "models")


def _tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", "(MLFLOW_TRACKING_URI unset)")


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def _cached_version(pinned: str) -> Path:
    """The local copy of `models:/NAME/VERSION`, downloaded first if this machine has none."""
    name, version = pinned.removeprefix("models:/").rsplit("/", 1)
    server = hashlib.sha256(_tracking_uri().encode()).hexdigest()[:12]  # two servers' "v1" are two models
    target = model_cache() / server / name / version
    if target.is_dir():
        return target
    locks = model_cache() / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{server}-{name}-{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # replicas starting together on one machine: one downloads
        if target.is_dir():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
        try:
            _download(pinned, name, version, tmp)
            os.rename(tmp, target)  # atomic: a reader sees no copy or a whole one
        except Exception as e:
            raise CheckpointError(f"cannot download {pinned} from the MLflow registry at {_tracking_uri()}: "
                                  f"{e}") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _download(pinned: str, name: str, version: str, dst: Path) -> None:
    """The version's files into `dst`, without the Hugging Face export beside a corral checkpoint."""
    import mlflow

    source = _client().get_model_version(name, version).source
    entries = mlflow.artifacts.list_artifacts(artifact_uri=source)
    names = {Path(e.path).name for e in entries}
    skip = {"hf"} if "corral.json" in names else set()
    for name_ in sorted(names - skip):
        mlflow.artifacts.download_artifacts(artifact_uri=f"{source.rstrip('/')}/{name_}", dst_path=str(dst))
    (dst / ".corral-source").write_text(f"{pinned}\n{source}\n")  # where this copy came from


def _find_checkpoint(root: Path, source: str) -> Path:
    if any((root / m).is_file() for m in CHECKPOINT_MARKERS):
        detect_format(root)
        return root
    found = sorted({p.parent for m in CHECKPOINT_MARKERS for p in root.rglob(m)})
    if len(found) != 1:
        raise CheckpointError(f"{source}: expected one checkpoint directory under {root}, found {len(found)}")
    detect_format(found[0])
    return found[0]
