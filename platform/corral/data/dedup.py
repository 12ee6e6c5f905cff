"""Duplicate documents out of pretraining data, across the whole corpus, on Ray Data.

Exact copies: documents whose text, lower-cased with whitespace collapsed, has the same SHA-1.
Near copies: documents whose word shingles (`shingle_words`-word n-grams of the lower-cased words)
have an estimated Jaccard similarity of at least `threshold`, estimated by MinHash with `num_perm`
permutations and found by LSH banding (datasketch's `MinHash`, and its `MinHashLSH` for the number
of bands b and rows r that minimise the weighted false positive and negative probabilities at
`threshold`: b=12, r=10 at 0.8 and 128 permutations; `LSH_WEIGHTS`). Every document has an id,
(file index << 32) | its position in the file, files in path order, so "the first copy" means the
same on every run and the kept document of a group is its smallest id.

The work is hash partitioned; no node holds a set of all hashes:

1. a `map_batches` actor computes per document its exact hash, its b band keys and its MinHash;
   it writes the MinHashes as Parquet beside the output itself (they are read back only for
   candidates), so the stream carries only the keys, ~110 bytes a document;
2. exact: the (id, exact hash, band keys) rows are grouped by exact hash (a Ray Data shuffle);
   each group keeps its smallest id;
3. near: the kept documents' (band key, id) rows are grouped by band key; each bucket of two or
   more gives candidate pairs (every pair, or each member with the bucket's smallest id where a
   bucket holds more than `BUCKET_PAIRS` documents, boilerplate shared by thousands of pages);
4. the candidates' MinHashes are fetched from the Parquet by id and each pair verified with
   datasketch's Jaccard estimate >= threshold; connected components of the verified pairs
   (union-find on the driver) keep each component's smallest id.

Step 4 is the only one on the driver: 16 bytes a candidate pair, and a candidate document's
MinHash (`4 * num_perm` bytes) and union-find entry (~200 bytes of Python objects): ~7 GB for 10M
candidate documents, a few percent of a web crawl's hundreds of millions. Beyond that the same
components come from label propagation over Ray Data joins of the pairs (a few rounds of O(pairs)
shuffles) and the verification from a join of the pairs with the MinHashes; not built, since no
corpus here needs it.

The result, `(id, near)` rows of the documents to drop, is written as one small `.npy` per corpus
file (grouped by file index), which the second read of that file looks up: the documents are
filtered where they are read, with nothing but their own file's drops in memory.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import Path

import numpy as np

from corral.config import DedupConfig

SEED = 1  # datasketch's default permutation seed: every actor and the verification must agree
SCHEME = "affine32"  # datasketch 2's default: 32-bit hash values, stored as uint32
BUCKET_PAIRS = 64  # above this many documents, a bucket's pairs are its members with its smallest id
# datasketch's weights of false positives and negatives when it picks the bands: a missed duplicate
# stays in the data, a false candidate costs one check. (0.2, 0.8) at 0.8 / 128: b=12 bands of r=10
# rows; a pair at J=0.8 is a candidate with probability 0.74, at 0.85 0.93, at 0.9 0.994 ((0.5, 0.5):
# b=9, r=13; 0.40, 0.69, 0.93).
LSH_WEIGHTS = (0.2, 0.8)
ROWS_PER_PARTITION = 2_000_000  # of a shuffle's (id, key...) rows: ~100-200 MB a reducer holds


def normalise(text: str) -> str:
    """The text as exact deduplication compares it: lower-cased, whitespace runs as one space."""
    return " ".join(text.lower().split())


def exact_hash(text: str) -> int:
    """SHA-1 of the normalised text, its first 8 bytes as a signed int64 (a Parquet column)."""
    return int.from_bytes(hashlib.sha1(normalise(text).encode("utf-8")).digest()[:8], "little", signed=True)


def shingles(text: str, size: int) -> list[bytes]:
    """The distinct `size`-word n-grams of the lower-cased words (punctuation ignored); a document
    with fewer words is one shingle of all of them."""
    words = re.findall(r"\w+", text.lower())
    grams = {" ".join(words[i:i + size]) for i in range(max(1, len(words) - size + 1))}
    return [g.encode("utf-8") for g in grams]


def lsh_bands(cfg: DedupConfig) -> list[tuple[int, int]]:
    """The (start, end) of each band of the MinHash, as datasketch's `MinHashLSH` chooses them."""
    from datasketch import MinHashLSH

    return MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, weights=LSH_WEIGHTS).hashranges


class Signatures:
    """`map_batches` actor: per readable document (`skip_reason` None), its id, exact hash and band
    keys (`band_0` ...: 8 bytes of a hash of the band index and its rows); its MinHash (uint32
    bytes) goes with its id to a Parquet file of the batch's in `minhash_dir`, not into the stream
    (a retried batch writes its file again: the same ids, read back once)."""

    def __init__(self, cfg: DedupConfig, minhash_dir: str, blocked_domains: tuple[str, ...] = ()):
        from datasketch import MinHash

        self.cfg, self.minhash_dir, self.blocked_domains = cfg, Path(minhash_dir), list(blocked_domains)
        self.template = MinHash(num_perm=cfg.num_perm, seed=SEED, scheme=SCHEME)  # permutations made once
        self.bands = lsh_bands(cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from corral.data.pretraining import skip_reason

        ids, exact, minhashes = [], [], []
        for doc_id, text, status, url in zip(batch["id"], batch["text"], batch["status"], batch["url"]):
            if skip_reason(text, status, url, self.blocked_domains) is not None:
                continue
            m = self.template.copy()
            m.update_batch(shingles(text, self.cfg.shingle_words))
            ids.append(doc_id)
            exact.append(exact_hash(text))
            minhashes.append(m.hashvalues.astype(np.uint32))
        hv = np.stack(minhashes) if minhashes else np.zeros((0, self.cfg.num_perm), np.uint32)  # (docs, num_perm)
        out = {"id": np.asarray(ids, dtype=np.int64), "exact": np.asarray(exact, dtype=np.int64)}
        for i, (start, end) in enumerate(self.bands):
            out[f"band_{i}"] = np.array([_band_key(i, row[start:end]) for row in hv], dtype=np.int64)
        if len(hv):
            import pyarrow as pa
            import pyarrow.parquet as pq

            self.minhash_dir.mkdir(parents=True, exist_ok=True)
            table = pa.table({"id": out["id"], "minhash": [row.tobytes() for row in hv]})
            pq.write_table(table, self.minhash_dir / f"{uuid.uuid4().hex}.parquet")
        return out


def _band_key(band: int, rows: np.ndarray) -> int:
    digest = hashlib.blake2b(band.to_bytes(2, "little") + rows.tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _first_of_each_copy(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One exact-hash group: its rows with `exact_copy` true on all but the smallest id."""
    first = group["id"] == group["id"].min()
    return {**group, "exact_copy": ~first}


def _bucket_pairs(bucket: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One band bucket: its candidate pairs (a < b), every pair of a bucket of up to `BUCKET_PAIRS`."""
    ids = np.unique(bucket["id"])  # sorted
    if len(ids) <= BUCKET_PAIRS:
        a, b = np.triu_indices(len(ids), k=1)
        return {"a": ids[a], "b": ids[b]}
    return {"a": np.full(len(ids) - 1, ids[0]), "b": ids[1:]}


def _band_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    bands = [k for k in batch if k.startswith("band_")]
    return {"band": np.concatenate([batch[k] for k in bands]), "id": np.tile(batch["id"], len(bands))}


def find_duplicates(docs, cfg: DedupConfig, work_dir: str | Path, blocked_domains: tuple[str, ...] = (),
                    num_actors: int = 1):
    """The documents of `docs` (a Ray Dataset of `id`, `text`, `status`, `url`) to drop, as a Ray
    Dataset of `id` and `near` (False: an exact copy); `work_dir` (storage every node mounts)
    holds the signatures while it runs. The same rows whatever the blocks of `docs`, whose
    object-store budget (its context's) bounds the documents in flight while they are signed."""
    import ray
    from ray.data.expressions import col

    minhash_dir = Path(work_dir) / "minhash"
    keys = docs.map_batches(Signatures, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=num_actors),
                            fn_constructor_kwargs=dict(cfg=cfg, minhash_dir=str(minhash_dir),
                                                       blocked_domains=tuple(blocked_domains))).materialize()
    n_docs, n_bands = keys.count(), len(lsh_bands(cfg))
    if cfg.exact:
        ranked = (keys.groupby("exact", num_partitions=_partitions(n_docs))
                  .map_groups(_first_of_each_copy, batch_format="numpy").materialize())
        del keys  # its blocks leave the object store (with the caller's collection)
    else:
        ranked = keys.map_batches(lambda b: {**b, "exact_copy": np.zeros(len(b["id"]), bool)}, batch_format="numpy")
    drops = ranked.filter(expr=col("exact_copy")).map_batches(
        lambda b: {"id": b["id"], "near": np.zeros(len(b["id"]), bool)}, batch_format="numpy")
    if cfg.near:
        pairs = (ranked.filter(expr=~col("exact_copy")).map_batches(_band_rows, batch_format="numpy")
                 .groupby("band", num_partitions=_partitions(n_docs * n_bands))
                 .map_groups(_bucket_pairs, batch_format="numpy"))
        near = near_copies(pairs, minhash_dir, cfg)
        drops = drops.union(ray.data.from_numpy(near).map_batches(
            lambda b: {"id": b["data"], "near": np.ones(len(b["data"]), bool)}, batch_format="numpy"))
    return drops


def _partitions(rows: int) -> int:
    """Hash partitions of a shuffle of `rows` rows: one per `ROWS_PER_PARTITION`, at most Ray's
    default (200), which alone costs minutes of task start-up on a small machine for a small corpus."""
    from ray.data import DataContext

    return max(1, min(DataContext.get_current().default_hash_shuffle_parallelism, rows // ROWS_PER_PARTITION + 1))


def near_copies(pairs, minhash_dir: Path, cfg: DedupConfig) -> np.ndarray:
    """The ids that near deduplication drops: candidate `pairs` (a Ray Dataset of `a`, `b`) verified
    with datasketch's Jaccard estimate, then every connected component's ids but its smallest."""
    import ray
    from datasketch import LeanMinHash

    batches = list(pairs.iter_batches(batch_format="numpy", batch_size=None))
    if not batches or not sum(len(b["a"]) for b in batches):
        return np.zeros(0, dtype=np.int64)
    ab = np.unique(np.stack([np.concatenate([b["a"] for b in batches]),
                             np.concatenate([b["b"] for b in batches])], axis=1), axis=0)  # (pairs, 2), each once
    wanted = np.unique(ab)
    found = ray.data.read_parquet(str(minhash_dir)).map_batches(
        lambda b: {k: v[np.isin(b["id"], wanted)] for k, v in b.items()}, batch_format="numpy")
    sketch = {int(i): LeanMinHash(seed=SEED, hashvalues=np.frombuffer(h, dtype=np.uint32), scheme=SCHEME)
              for b in found.iter_batches(batch_format="numpy", batch_size=None) for i, h in zip(b["id"], b["minhash"])}
    parent = {int(i): int(i) for i in wanted}

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    for a, b in ab.tolist():
        if sketch[a].jaccard(sketch[b]) >= cfg.threshold:
            ra, rb = root(a), root(b)
            parent[max(ra, rb)] = min(ra, rb)  # the smallest id stays the root: it is the one kept
    return np.array(sorted(x for x in parent if root(x) != x), dtype=np.int64)


def write_drops(drops, out_dir: str | Path) -> dict[str, int]:
    """`drops` (from `find_duplicates`) as one `NNNNNNNN.npy` per corpus file that has any: the
    positions in the file, times 2, plus 1 for a near copy. Returns the counts, `exact` and `near`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def write(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        file = int(group["id"][0] >> 32)
        np.save(out / f"{file:08d}.npy", np.sort((group["id"] & 0xFFFFFFFF) * 2 + group["near"]))
        return {"exact": [int((~group["near"]).sum())], "near": [int(group["near"].sum())]}

    counts = {"exact": 0, "near": 0}
    if drops.count():
        files = drops.map_batches(lambda b: {**b, "file": b["id"] >> 32}, batch_format="numpy")
        for row in files.groupby("file").map_groups(write, batch_format="numpy").iter_rows():
            counts = {k: counts[k] + int(row[k]) for k in counts}
    return counts


def read_drops(drops_dir: str | Path, file: int) -> dict[int, str]:
    """Position in file -> `exact_duplicate` or `near_duplicate`, for one corpus file."""
    path = Path(drops_dir) / f"{file:08d}.npy"
    if not path.is_file():
        return {}
    return {int(c) >> 1: "near_duplicate" if c & 1 else "exact_duplicate" for c in np.load(path)}
