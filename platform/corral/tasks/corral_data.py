"""lm-eval `custom_dataset` for the task YAMLs in this directory: their `dataset_kwargs.data_files`
(JSON lines) are read from `data/` here, wherever corral is installed (lm-eval's plain
`dataset_path: json` would read them relative to the current directory)."""

from pathlib import Path

DATA = Path(__file__).parent / "data"


def load_json(data_files: dict[str, str], **_):
    import datasets

    return datasets.load_dataset("json", data_files={split: str(DATA / name) for split, name in data_files.items()})
