"""Pretraining data on Ray Data: corpus files -> tokens -> packed fixed-length blocks -> shards.

A document is a plain-text file, a JSONL record's `text` or a Parquet row's `text`. Each is
tokenised by a `map_batches` actor holding the SentencePiece model, framed as `<s> ... </s>`
(BOS, tokens, EOS: Llama 2's document boundary), assigned to train or validation by a hash of
its text (so the split is stable across runs and machines), and the tokens of a batch of
documents are packed into blocks of `seq_len + 1` tokens with no padding: inputs are
block[:-1], targets block[1:]. The tail of each batch that does not fill a block is dropped and
counted. Empty and undecodable documents are skipped and counted, never fatal.

The corpus streams through Ray's workers and object store in bounded memory: nothing is
shuffled or materialised as a whole, and the counts travel with the blocks to the writer, so the
driver only lists files and reads the totals at the end. Write tasks write shards of
`shard_blocks` to twice that many blocks: flat `.npy` arrays of (blocks, seq_len + 1) token ids
(uint16 for vocabularies up to 65,536), memory-mapped by training, which shuffles them
(`corral.data.reader`; docs/data.md). Output layout (written atomically):

    out_dir/manifest.json            the shards with their block counts, tokenizer sha256, counts
    out_dir/tokenizer.model          the tokenizer the ids belong to
    out_dir/train/TTTTTT-NNNN.npy    (blocks, seq_len + 1) token ids; T: the write task
    out_dir/validation/TTTTTT-NNNN.npy
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import random
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from ray.data import Datasink

from corral.checkpoint import atomic_dir, load_tokenizer
from corral.config import PrepareDataConfig
from corral.data import quiet_progress_bars
from corral.data.dedup import find_duplicates, read_drops, write_drops
from corral.data.hygiene import KINDS as PII_KINDS
from corral.data.hygiene import blocked, mask, scrub_pii
from corral.data.reader import MIX_SHARDS
from corral.tokenizer import Tokenizer

MANIFEST = "manifest.json"
PII_SAMPLES_FILE = "pii_samples.jsonl"
DEDUP_DIR = ".dedup"  # signatures and drop lists while the step runs, removed before the output is complete
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
    return [{"text": text or "", "status": "ok" if text is not None else "undecodable", "url": ""}]


def jsonl_file_docs(row: dict) -> list[dict]:
    """Each line of a JSONL file with a string `text` field is one document; its `url`, if any,
    is where it came from (the domain block list reads it)."""
    text = _decode(row["bytes"])
    if text is None:
        return [{"text": "", "status": "undecodable", "url": ""}]
    docs = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            docs.append({"text": "", "status": "undecodable", "url": ""})
            continue
        ok = isinstance(record, dict) and isinstance(record.get("text"), str)
        url = record.get("url") if ok and isinstance(record.get("url"), str) else ""
        docs.append({"text": record["text"] if ok else "", "status": "ok" if ok else "no_text_field", "url": url})
    return docs


def parquet_file_docs(row: dict) -> list[dict]:
    """Each row of a Parquet file's `text` column is one document (a null is an empty one)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = pq.read_table(pa.BufferReader(row["bytes"]), columns=["text"]).column("text").to_pylist()
    return [{"text": t or "", "status": "ok", "url": ""} for t in texts]


FILE_DOCS = {"text": text_file_docs, "jsonl": jsonl_file_docs, "parquet": parquet_file_docs}


def read_documents(files: dict[str, list[str]], drops_dir: Path | None = None):
    """The documents of the files `list_corpus` found, as a Ray Dataset of `id`, `text`, `status`,
    `url`. A document's id is (file << 32) | its position in the file, files numbered in path order
    (whatever order they are read in); with `drops_dir` (`corral.data.dedup.write_drops`), the
    status of each document deduplication drops is `exact_duplicate` or `near_duplicate`.

    A file is read whole by one task (Parquet too: positions in the file need all of it).
    """
    import ray

    index = {_path_key(name): i for i, name in enumerate(sorted(n for names in files.values() for n in names))}

    def numbered(kind: str):
        def docs(row: dict) -> list[dict]:
            file = index.get(_path_key(row["path"]))
            if file is None:
                raise CorpusError(f"Ray Data read {row['path']}, which is none of the corpus files listed "
                                  f"({len(index)}); report this with the inputs used")
            drops = read_drops(drops_dir, file) if drops_dir is not None else {}
            out = FILE_DOCS[kind](row)
            for j, doc in enumerate(out):
                doc["id"] = file << 32 | j
                if j in drops:
                    doc["status"] = drops[j]
            return out
        return docs

    parts = [ray.data.read_binary_files(names, include_paths=True).flat_map(numbered(kind))
             for kind, names in files.items() if names]
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _path_key(name: str) -> str:
    """A file's path without its URI scheme: how Ray Data's `include_paths` names it."""
    return name.split("://", 1)[-1]


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


DUPLICATES = ("exact_duplicate", "near_duplicate")
STATS = ("documents", "skipped_undecodable", "skipped_empty", "skipped_no_text_field", "skipped_blocked_domain",
         *(f"skipped_{d}" for d in DUPLICATES), "dropped_tokens", "duplicate_tokens",
         *(f"pii_{kind}" for kind in PII_KINDS))
PII_SAMPLES = 200  # replacements kept for review (masked), of the whole corpus


def skip_reason(text: str, status: str, url: str, blocked_domains: list[str]) -> str | None:
    """Why a document read from the corpus is not tokenised (its `skipped_*` count), or None."""
    if status != "ok":
        return status
    if not text.strip():
        return "empty"
    if blocked(url, blocked_domains):
        return "blocked_domain"
    return None


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (Llama 2's 32k vocabulary): half the bytes of int32 on disk and read."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


class PackBlocks:
    """`map_batches` actor: tokenise a batch of documents and pack each split into blocks.

    Rows out: one per block (`tokens`, `split`), and the batch's counts (`STATS`) as columns of
    its first row, zero on the others; a batch with no block gives one row of split "" that
    carries only counts. The writer sums the columns: totals without a call per batch.
    """

    def __init__(self, tokenizer_path: str, block_len: int, val_fraction: float, scrub_pii: bool = False,
                 blocked_domains: tuple[str, ...] = ()):
        self.tokenizer = Tokenizer(tokenizer_path)  # loaded once per actor, not per batch
        self.block_len, self.val_fraction = block_len, val_fraction
        self.scrub_pii, self.blocked_domains = scrub_pii, list(blocked_domains)
        self.dtype = token_dtype(self.tokenizer.vocab_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stats: Counter = Counter()
        ids: dict[str, list[int]] = {s: [] for s in SPLITS}
        samples: list[dict] = []
        for text, status, url in zip(batch["text"], batch["status"], batch["url"]):
            reason = skip_reason(text, status, url, self.blocked_domains)
            if reason is not None:
                stats[f"skipped_{reason}"] += 1
                if reason in DUPLICATES:  # what the duplicates would have cost: the share removed
                    stats["duplicate_tokens"] += len(self.tokenizer.encode(text, bos=True, eos=True))
            else:
                stats["documents"] += 1
                split = "validation" if in_validation(text, self.val_fraction) else "train"  # of the text as found
                if self.scrub_pii:
                    text, found, replaced = scrub_pii(text)
                    stats.update({f"pii_{kind}": n for kind, n in found.items()})
                    samples += [{"kind": k, "masked": mask(t)} for k, t in replaced[:PII_SAMPLES - len(samples)]]
                ids[split] += self.tokenizer.encode(text, bos=True, eos=True)
        blocks, splits = [], []
        for split, tokens in ids.items():
            n = len(tokens) // self.block_len
            stats["dropped_tokens"] += len(tokens) - n * self.block_len
            blocks.append(np.asarray(tokens[:n * self.block_len], dtype=self.dtype).reshape(n, self.block_len))
            splits += [split] * n
        if not splits:  # nothing to write, but the counts must still reach the writer
            blocks.append(np.zeros((1, self.block_len), dtype=self.dtype))
            splits.append("")
        out = {"tokens": np.concatenate(blocks), "split": np.array(splits, dtype=object)}
        for key in STATS:
            out[key] = np.zeros(len(splits), dtype=np.int64)
            out[key][0] = stats[key]
        out["pii_samples"] = np.array([json.dumps(samples)] + [""] * (len(splits) - 1), dtype=object)
        return out


class ShardSink(Datasink):
    """Ray Data `Datasink`: each write task gets at least `shard_blocks` blocks (Ray bundles its
    inputs) and writes them as `.npy` shards of `shard_blocks` to twice that many blocks per split
    (fewer only where a split has fewer), memory-mappable; it returns the shards and the summed
    counts, which reach the driver once, in `on_write_complete`.

    A write task's own data is all it holds: memory is bounded by the shard size, not the corpus.
    """

    def __init__(self, root: Path, shard_blocks: int):
        self.root, self.shard_blocks = root, shard_blocks
        self.shards: list[dict] = []
        self.counts: Counter = Counter()
        self.pii_samples: list[dict] = []

    @property
    def min_rows_per_write(self) -> int:
        return self.shard_blocks

    def write(self, blocks, ctx) -> dict:
        from ray.data.block import BlockAccessor

        columns = [BlockAccessor.for_block(b).to_numpy() for b in blocks]
        columns = [c for c in columns if len(c["split"])]
        split = np.concatenate([c["split"] for c in columns])
        counts = {k: int(sum(c[k].sum() for c in columns)) for k in STATS}
        samples = [s for c in columns for row in c["pii_samples"] if row for s in json.loads(row)][:PII_SAMPLES]
        shards = []
        for name in SPLITS:
            if not (split == name).any():
                continue
            rows = np.concatenate([c["tokens"][c["split"] == name] for c in columns])
            (self.root / name).mkdir(parents=True, exist_ok=True)
            # more than one shard's worth (one large input block): shards of shard_blocks to twice that
            for j, part in enumerate(np.array_split(rows, max(1, len(rows) // self.shard_blocks))):
                path = f"{name}/{ctx.task_idx:06d}-{j:04d}.npy"
                np.save(self.root / path, part)
                shards.append({"split": name, "path": path, "blocks": len(part)})
        return {"shards": shards, "counts": counts, "pii_samples": samples}

    def on_write_complete(self, write_result) -> None:
        for result in write_result.write_returns:
            self.shards += result["shards"]
            self.counts.update(result["counts"])
            self.pii_samples += result["pii_samples"][:PII_SAMPLES - len(self.pii_samples)]


# -- the whole preparation -----------------------------------------------------------------------
def prepare_pretraining_data(config: PrepareDataConfig, out_dir: str | os.PathLike,
                             tokenizer_path: str | os.PathLike, seed: int = 0) -> dict:
    """Run the Ray Data pipeline and write shards + manifest to `out_dir` atomically; the manifest.

    `tokenizer_path`: tokenizer.model or the directory holding it. `out_dir` must be on a file
    system every node mounts (write tasks run anywhere). `seed` shuffles the file order, so the
    documents of one shard come from across the corpus (training shuffles the rest).
    """
    files = list_corpus(config.inputs)  # first: a bad corpus fails before anything else
    tokenizer = load_tokenizer(tokenizer_path)
    block_len = config.seq_len + 1
    shard_mb = config.shard_blocks * block_len * token_dtype(tokenizer.vocab_size).itemsize / 2**20
    if config.object_store_mb < 2 * shard_mb:
        raise ValueError(f"prepare_data: object_store_mb {config.object_store_mb} is less than two shards "
                         f"({2 * shard_mb:,.0f} MB at shard_blocks {config.shard_blocks}); raise object_store_mb or "
                         f"lower shard_blocks")
    quiet_progress_bars()
    for names in files.values():
        random.Random(seed).shuffle(names)
    n_files = sum(len(v) for v in files.values())
    print(f"prepare_data: tokenising {n_files} files into {block_len}-token blocks "
          f"({config.num_tokenizer_actors} tokenizer actors), shards of {config.shard_blocks} blocks", flush=True)
    budget = config.object_store_mb * 2**20
    with atomic_dir(out_dir) as tmp:
        dedup = config.dedup.exact or config.dedup.near
        docs = _budgeted(read_documents(files), budget)
        if dedup:
            # A first read finds the duplicates; the second drops them where each file is read. The
            # first holds no shards, which are most of the budget: it gets a quarter (with all of it,
            # the memory test's 50M-token corpus peaked at 62 MiB vs 39 for 10M, 1.6x).
            drops = find_duplicates(_budgeted(read_documents(files), budget // 4), config.dedup, tmp / DEDUP_DIR,
                                    tuple(config.blocked_domains), config.num_tokenizer_actors)
            counts = write_drops(drops, tmp / DEDUP_DIR / "drops")
            del drops  # the keys and shuffle outputs leave the object store before tokenising (a Dataset
            gc.collect()  # sits in reference cycles: without a collection they stayed, 69 vs 43 MiB peaks)
            print(f"prepare_data: {counts['exact']:,} exact and {counts['near']:,} near duplicates to drop", flush=True)
            docs = _budgeted(read_documents(files, tmp / DEDUP_DIR / "drops"), budget)
        manifest = _tokenise(config, docs, tokenizer, block_len, tmp, dedup)
        shutil.rmtree(tmp / DEDUP_DIR, ignore_errors=True)
    return manifest


def _budgeted(ds, budget: int):
    """`ds` under the step's object-store budget. Without one, the reads run ahead of tokenisation
    until Ray's default share of the object store is full (measured: 64 MB in flight for 10M
    tokens, 280 MB for 50M): bounded by the store, not by the work. With it, Ray Data's streaming
    executor holds back reads."""
    limits = ds.context.execution_options.resource_limits
    ds.context.execution_options.resource_limits = limits.copy(object_store_memory=budget)
    return ds


def _tokenise(config: PrepareDataConfig, docs, tokenizer: Tokenizer, block_len: int, tmp: Path,
              dedup: bool) -> dict:
    """Tokenise, pack and write `docs` into `tmp`, and write the manifest; the manifest."""
    import ray

    packed = _budgeted(docs.map_batches(
        PackBlocks, batch_size=config.docs_per_batch, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=config.num_tokenizer_actors),
        fn_constructor_kwargs=dict(tokenizer_path=str(tokenizer.path), block_len=block_len,
                                   val_fraction=config.val_fraction, scrub_pii=config.scrub_pii,
                                   blocked_domains=tuple(config.blocked_domains)),
    ), config.object_store_mb * 2**20)
    sink = ShardSink(tmp, config.shard_blocks)
    packed.write_datasink(sink)  # streams: read, tokenise, pack and write overlap
    stats = {k: v for k, v in sink.counts.items() if v}
    blocks = {s: sum(sh["blocks"] for sh in sink.shards if sh["split"] == s) for s in SPLITS}
    if stats.get("documents", 0) == 0 or blocks["train"] + blocks["validation"] == 0:
        raise CorpusError(f"no training blocks from {', '.join(config.inputs)}: {_describe(stats)}; the "
                          f"corpus needs at least {block_len} tokens of readable text")
    print(f"prepare_data: {sum(blocks.values()):,} blocks from {stats['documents']:,} documents in "
          f"{len(sink.shards)} shards", flush=True)
    manifest = {"format": "npy", "dtype": token_dtype(tokenizer.vocab_size).name, "seq_len": config.seq_len,
                "block_len": block_len, "tokenizer_sha256": tokenizer.fingerprint,
                "vocab_size": tokenizer.vocab_size, "inputs": config.inputs, "val_fraction": config.val_fraction,
                "documents": {k: v for k, v in stats.items() if not k.endswith("_tokens") and not k.startswith("pii_")},
                "dropped_tokens": stats.get("dropped_tokens", 0),
                "pii": {k: stats.get(f"pii_{k}", 0) for k in PII_KINDS} if config.scrub_pii else None,
                "dedup": None,
                "blocked_domains": config.blocked_domains, "splits": {}}
    for split in SPLITS:
        shards = sorted(({"path": s["path"], "blocks": s["blocks"], "tokens": s["blocks"] * block_len}
                         for s in sink.shards if s["split"] == split), key=lambda s: s["path"])
        manifest["splits"][split] = {"shards": shards, "blocks": blocks[split], "tokens": blocks[split] * block_len}
    if dedup:
        # the share of the tokens read (duplicates as found, the rest as tokenised) that deduplication removed
        removed = stats.get("duplicate_tokens", 0)
        read = sum(blocks.values()) * block_len + stats.get("dropped_tokens", 0)
        manifest["dedup"] = {**config.dedup.model_dump(), "exact_duplicates": stats.get("skipped_exact_duplicate", 0),
                             "near_duplicates": stats.get("skipped_near_duplicate", 0), "tokens_removed": removed,
                             "tokens_removed_share": removed / (removed + read)}
    if config.scrub_pii:
        (tmp / PII_SAMPLES_FILE).write_text("".join(json.dumps(s) + "\n" for s in sink.pii_samples))
    shutil.copyfile(tokenizer.path, tmp / "tokenizer.model")
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _describe(stats: dict) -> str:
    return ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in sorted(stats.items())) or "no documents"


# -- reading it back -----------------------------------------------------------------------------
def read_manifest(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise CorpusError(f"{data_dir} holds no {MANIFEST}; run the prepare_data step (or "
                          f"`pipelines.steps.prepare_data.run`) to create it")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != "npy":
        raise CorpusError(f"{path} describes {manifest.get('format')} shards from an older corral; run the "
                          f"prepare_data step again to write memory-mappable .npy shards")
    return manifest


class TokenShards:
    """The packed blocks of one prepared split as a reader source (`corral.data.reader`): shards
    memory-mapped when first read, rows read one by one, never a whole shard."""

    shuffle = True

    def __init__(self, data_dir: str | os.PathLike, split: str):
        manifest = read_manifest(data_dir)
        shards = manifest["splits"][split]["shards"]
        if not shards:
            raise CorpusError(f"{data_dir} has no {split} blocks; add documents or change val_fraction")
        self.root = str(data_dir)
        self.paths = [s["path"] for s in shards]
        self.sizes = [s["blocks"] for s in shards]
        self.row_bytes = manifest["block_len"] * np.dtype(manifest["dtype"]).itemsize
        self._open: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict:  # sent to workers without open maps
        return {**self.__dict__, "_open": {}}

    def read(self, shard: int, rows: np.ndarray) -> dict[str, np.ndarray]:
        if shard not in self._open:
            if len(self._open) >= 4 * MIX_SHARDS:  # a few windows' shards stay mapped
                self._open.clear()
            self._open[shard] = np.load(Path(self.root) / self.paths[shard], mmap_mode="r")
        return {"tokens": self._open[shard][rows].astype(np.int64)}  # embedding lookups take int64
