"""Pretraining data on Ray Data: corpus files -> tokens -> packed fixed-length blocks -> shards.

A document is a plain-text file, a JSONL record's `text` or a Parquet row's `text`. Each is
tokenised by a `map_batches` actor holding the SentencePiece model, framed as `<s> ... </s>`
(BOS, tokens, EOS: Llama 2's document boundary), assigned to train or validation by a hash of
its text (so the split is stable across runs and machines), and the tokens of a batch of
documents are packed into blocks of `seq_len + 1` tokens with no padding: inputs are
block[:-1], targets block[1:]. The tail of each batch that does not fill a block is dropped and
counted. Empty and undecodable documents are skipped and counted, never fatal.

The driver only lists files and reads the final counts; the corpus flows through Ray's object
store and workers. Output layout (written atomically):

    out_dir/manifest.json            shards, block and token counts, tokenizer sha256, skip counts
    out_dir/tokenizer.model          the tokenizer the ids belong to
    out_dir/train/*.parquet|*.npy    column `tokens`: int32 blocks of seq_len + 1
    out_dir/validation/...
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from corral.checkpoint import atomic_dir, load_tokenizer
from corral.config import PrepareDataConfig
from corral.data import quiet_progress_bars
from corral.tokenizer import Tokenizer

MANIFEST = "manifest.json"
SPLITS = ("train", "validation")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)


class CorpusError(ValueError):
    """A corpus that cannot be prepared: names the path and what to do."""


# -- finding the files ---------------------------------------------------------------------------
def list_corpus(inputs: list[str]) -> dict[str, list[str]]:
    """Files under `inputs` (paths or URIs, files or directories) by kind: text, jsonl, parquet.

    Raises before any Ray work if a path is missing or nothing under the inputs has any bytes.
    """
    import pyarrow.fs as pafs

    kinds: dict[str, list[str]] = {"text": [], "jsonl": [], "parquet": []}
    total_bytes = 0
    for item in inputs:
        uri = item if "://" in item else str(Path(item).resolve())
        fs, path = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise CorpusError(f"corpus path {item} does not exist; check the path, or get the demo corpus "
                              f"with `corral data fetch-demo DIR`")
        infos = [info] if info.type == pafs.FileType.File else fs.get_file_info(pafs.FileSelector(path, recursive=True))
        for f in sorted((f for f in infos if f.type == pafs.FileType.File), key=lambda f: f.path):
            if Path(f.path).name.startswith("."):
                continue
            name = f.path if "://" not in item else f"{uri.split('://')[0]}://{f.path}"
            suffix = Path(f.path).suffix.lower()
            kind = "jsonl" if suffix in JSONL_SUFFIXES else "parquet" if suffix in PARQUET_SUFFIXES else "text"
            kinds[kind].append(name)
            total_bytes += f.size or 0
    if total_bytes == 0:
        raise CorpusError(f"the corpus {', '.join(inputs)} is empty (no file with any content); "
                          f"point `inputs` at text, JSONL or Parquet files")
    return kinds


# -- documents -----------------------------------------------------------------------------------
def _decode(data: bytes) -> str | None:
    """UTF-8 text, or None for bytes that are not text (invalid UTF-8 or NUL bytes: a binary file)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\x00" in text else text


def text_file_docs(row: dict) -> list[dict]:
    """A plain-text file is one document."""
    text = _decode(row["bytes"])
    return [{"text": text or "", "status": "ok" if text is not None else "undecodable"}]


def jsonl_file_docs(row: dict) -> list[dict]:
    """Each line of a JSONL file with a string `text` field is one document."""
    text = _decode(row["bytes"])
    if text is None:
        return [{"text": "", "status": "undecodable"}]
    docs = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            docs.append({"text": "", "status": "undecodable"})
            continue
        ok = isinstance(record, dict) and isinstance(record.get("text"), str)
        docs.append({"text": record["text"] if ok else "", "status": "ok" if ok else "no_text_field"})
    return docs


def corpus_texts(files: dict[str, list[str]]) -> Iterator[str]:
    """The readable documents of the files `list_corpus` found, one after another, read in the
    driver (the tokenizer step samples lines from them; `prepare_pretraining_data` reads the same
    files on Ray Data)."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    for kind, names in files.items():
        for name in names:
            fs, path = pafs.FileSystem.from_uri(name if "://" in name else str(Path(name).resolve()))
            if kind == "parquet":
                with fs.open_input_file(path) as f:
                    yield from (t for t in pq.read_table(f, columns=["text"]).column("text").to_pylist() if t)
                continue
            with fs.open_input_stream(path) as f:
                row = {"bytes": f.read()}
            docs = text_file_docs(row) if kind == "text" else jsonl_file_docs(row)
            yield from (d["text"] for d in docs if d["status"] == "ok" and d["text"])


def in_validation(text: str, val_fraction: float) -> bool:
    """The document's split from a hash of its text: stable across runs, machines and file order."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return h / 2**64 < val_fraction


class PackBlocks:
    """`map_batches` actor: tokenise a batch of documents and pack each split into blocks."""

    def __init__(self, tokenizer_path: str, block_len: int, val_fraction: float, counter):
        self.tokenizer = Tokenizer(tokenizer_path)  # loaded once per actor, not per batch
        self.block_len, self.val_fraction, self.counter = block_len, val_fraction, counter

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stats: Counter = Counter()
        ids: dict[str, list[int]] = {s: [] for s in SPLITS}
        for text, status in zip(batch["text"], batch["status"]):
            if status != "ok":
                stats[f"skipped_{status}"] += 1
            elif not text.strip():
                stats["skipped_empty"] += 1
            else:
                stats["documents"] += 1
                ids["validation" if in_validation(text, self.val_fraction) else "train"] += \
                    self.tokenizer.encode(text, bos=True, eos=True)
        blocks, splits = [], []
        for split, tokens in ids.items():
            n = len(tokens) // self.block_len
            stats["dropped_tokens"] += len(tokens) - n * self.block_len
            blocks.append(np.asarray(tokens[:n * self.block_len], dtype=np.int32).reshape(n, self.block_len))
            splits += [split] * n
        import ray

        ray.get(self.counter.add.remote(dict(stats)))  # synchronous: totals are complete when the job ends
        return {"tokens": np.concatenate(blocks), "split": np.array(splits, dtype=object)}


def _counter_actor():
    import ray

    @ray.remote(num_cpus=0)
    class StatsCounter:
        def __init__(self):
            self.totals: Counter = Counter()

        def add(self, stats: dict) -> None:
            self.totals.update(stats)

        def get(self) -> dict:
            return dict(self.totals)

    return StatsCounter.remote()


# -- the whole preparation -----------------------------------------------------------------------
def prepare_pretraining_data(config: PrepareDataConfig, out_dir: str | os.PathLike,
                             tokenizer_path: str | os.PathLike, seed: int = 0) -> dict:
    """Run the Ray Data pipeline and write shards + manifest to `out_dir` atomically; the manifest.

    `tokenizer_path`: tokenizer.model or the directory holding it.
    """
    import ray

    files = list_corpus(config.inputs)  # first: a bad corpus fails before anything else
    tokenizer = load_tokenizer(tokenizer_path)
    block_len = config.seq_len + 1
    quiet_progress_bars()
    n_files = sum(len(v) for v in files.values())
    print(f"prepare_data: tokenising {n_files} files into {block_len}-token blocks "
          f"({config.num_tokenizer_actors} tokenizer actors)", flush=True)
    parts = []
    if files["text"]:
        parts.append(ray.data.read_binary_files(files["text"]).flat_map(text_file_docs))
    if files["jsonl"]:
        parts.append(ray.data.read_binary_files(files["jsonl"]).flat_map(jsonl_file_docs))
    if files["parquet"]:
        parts.append(ray.data.read_parquet(files["parquet"], columns=["text"])
                     .map(lambda row: {"text": row["text"] or "", "status": "ok"}))
    docs = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]

    counter = _counter_actor()
    packed = docs.map_batches(
        PackBlocks, batch_size=config.docs_per_batch, batch_format="numpy", concurrency=config.num_tokenizer_actors,
        fn_constructor_kwargs=dict(tokenizer_path=str(tokenizer.path), block_len=block_len,
                                   val_fraction=config.val_fraction, counter=counter),
    )
    # Shuffle blocks once here, so training can read them in a fixed order (exact resume).
    packed = packed.random_shuffle(seed=seed).materialize()  # in the object store, not the driver
    stats = ray.get(counter.get.remote())
    ray.kill(counter)
    n_blocks = packed.count()
    if stats.get("documents", 0) == 0 or n_blocks == 0:
        raise CorpusError(f"no training blocks from {', '.join(config.inputs)}: {_describe(stats)}; the corpus "
                          f"needs at least {block_len} tokens of readable text")
    print(f"prepare_data: {n_blocks:,} blocks from {stats['documents']:,} documents; writing "
          f"{config.output_format} shards", flush=True)

    with atomic_dir(out_dir) as tmp:
        manifest = {"format": config.output_format, "seq_len": config.seq_len, "block_len": block_len,
                    "tokenizer_sha256": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                    "inputs": config.inputs, "val_fraction": config.val_fraction,
                    "documents": {k: v for k, v in stats.items() if k != "dropped_tokens"},
                    "dropped_tokens": stats.get("dropped_tokens", 0), "splits": {}}
        for split in SPLITS:
            part = packed.filter(lambda row, s=split: row["split"] == s).select_columns(["tokens"])
            if config.output_format == "parquet":
                part.write_parquet(str(tmp / split))
            else:
                part.write_numpy(str(tmp / split), column="tokens")
            manifest["splits"][split] = _shard_list(tmp, split, config.output_format, block_len)
        shutil.copyfile(tokenizer.path, tmp / "tokenizer.model")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _shard_list(root: Path, split: str, fmt: str, block_len: int) -> dict:
    import pyarrow.parquet as pq

    shards = []
    for f in sorted((root / split).glob("*.parquet" if fmt == "parquet" else "*.npy")):
        rows = pq.read_metadata(f).num_rows if fmt == "parquet" else np.load(f, mmap_mode="r").shape[0]
        shards.append({"path": f"{split}/{f.name}", "blocks": rows, "tokens": rows * block_len})
    return {"shards": shards, "blocks": sum(s["blocks"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards)}


def _describe(stats: dict) -> str:
    return ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in sorted(stats.items())) or "no documents"


# -- reading it back -----------------------------------------------------------------------------
def read_manifest(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise CorpusError(f"{data_dir} holds no {MANIFEST}; run the prepare_data step (or "
                          f"`pipelines.steps.prepare_data.run`) to create it")
    return json.loads(path.read_text())


# Splits up to this size are read whole here, in the driver, and handed to Ray as one in-memory dataset.
# Ray Data's streaming read starts a list task and read tasks in fresh worker processes: on 2 cores
# that took 9-15 s per split before the first batch (0.1-0.4 s in memory), for files of a few MB.
IN_MEMORY_BYTES = 64 * 2**20


def load_packed(data_dir: str | os.PathLike, split: str, in_memory_bytes: int = IN_MEMORY_BYTES):
    """The packed blocks of one split, in shard order, as a Ray Dataset with an int32 `tokens` column."""
    import ray.data  # before pyarrow reads: it registers the tensor type of the `tokens` column

    manifest = read_manifest(data_dir)
    files = [str(Path(data_dir) / s["path"]) for s in manifest["splits"][split]["shards"]]
    if not files:
        raise CorpusError(f"{data_dir} has no {split} blocks; add documents or change val_fraction")
    parquet = manifest["format"] == "parquet"
    if sum(os.path.getsize(f) for f in files) <= in_memory_bytes:
        import pyarrow as pa
        import pyarrow.parquet as pq
        from ray.data.extensions import ArrowTensorArray

        table = (pa.concat_tables([pq.read_table(f) for f in files]) if parquet else
                 pa.table({"tokens": ArrowTensorArray.from_numpy(np.concatenate([np.load(f) for f in files]))}))
        return ray.data.from_arrow(table)
    if parquet:
        return ray.data.read_parquet(files)
    return ray.data.read_numpy(files).rename_columns({"data": "tokens"})
