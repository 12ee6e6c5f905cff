"""Pretraining data preparation on a real Ray cluster: packing, splits, skips, manifest, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corral.data.pretraining import CorpusError, in_validation, list_corpus, read_manifest

SEQ_LEN = 64


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory, corpus):
    """Four plays, a binary file, an empty file, JSONL with good/bad/empty records, and Parquet."""
    d = tmp_path_factory.mktemp("mixed")
    plays = sorted(corpus.glob("*_gut.txt"))[:4]
    for f in plays:
        shutil.copy(f, d / f.name)
    (d / "image.txt").write_bytes(bytes(range(256)) * 40)  # binary, whatever its name says
    (d / "empty.txt").write_text("   \n")
    (d / "records.jsonl").write_text("\n".join([
        json.dumps({"text": "To be, or not to be, that is the question. " * 20}),
        "{not json",
        json.dumps({"text": ""}),
        json.dumps({"title": "no text field"}),
    ]) + "\n")
    pq.write_table(pa.table({"text": ["Now is the winter of our discontent " * 30, "All the world's a stage " * 30]}),
                   d / "more.parquet")
    docs = [f.read_bytes().decode("utf-8") for f in plays]  # as the pipeline reads them: no newline translation
    docs += ["To be, or not to be, that is the question. " * 20, "Now is the winter of our discontent " * 30,
             "All the world's a stage " * 30]
    return d, docs


def all_blocks(data_dir, split) -> np.ndarray:
    """Every block of a split, shard after shard in the manifest's order, read straight from the files."""
    shards = read_manifest(data_dir)["splits"][split]["shards"]
    return np.concatenate([np.load(data_dir / s["path"]) for s in shards])


def test_prepare_packs_every_token_and_counts_every_skip(ray_cluster, tokenizer, mixed_corpus, tmp_path, capfd):
    from ray.data import DataContext

    from pipelines.steps import prepare_data

    src, docs = mixed_corpus
    DataContext.get_current().enable_progress_bars = True  # Ray's default (earlier tests turn them off)
    out = prepare_data.run({"inputs": [str(src)], "seq_len": SEQ_LEN, "val_fraction": 0.3},
                           {"tokenizer": str(tokenizer.path.parent), "output_dir": str(tmp_path / "data")})
    printed = capfd.readouterr()
    assert "prepare_data: tokenising 8 files" in printed.out and "from 7 documents" in printed.out, printed.out
    assert "row/s" not in printed.out + printed.err  # no progress-bar redraws in the step's log
    manifest = read_manifest(out["data"])
    assert manifest["documents"] == {"documents": 7, "skipped_undecodable": 2, "skipped_empty": 2,
                                     "skipped_no_text_field": 1}
    assert manifest["tokenizer_sha256"] == tokenizer.fingerprint and manifest["block_len"] == SEQ_LEN + 1

    # every token of every kept document (with <s> ... </s>) is in a block or counted as dropped
    encoded = [tokenizer.encode(t, bos=True, eos=True) for t in docs]
    splits = manifest["splits"]
    assert splits["train"]["tokens"] + splits["validation"]["tokens"] + manifest["dropped_tokens"] == \
        sum(map(len, encoded))
    val_tokens = sum(len(e) for t, e in zip(docs, encoded) if in_validation(t, 0.3))
    assert 0 < splits["validation"]["tokens"] <= val_tokens  # the hash put some documents there

    assert manifest["dtype"] == "uint16" and len(splits["train"]["shards"]) >= 1
    blocks = all_blocks(tmp_path / "data", "train")
    assert blocks.shape == (splits["train"]["blocks"], SEQ_LEN + 1) and blocks.dtype == np.uint16
    assert blocks.min() >= 0 and blocks.max() < tokenizer.vocab_size
    flat = blocks.ravel()
    assert (flat == tokenizer.eos_id).sum() >= 1 and (flat == tokenizer.bos_id).sum() >= 1  # no padding id at all
    assert (tmp_path / "data" / "tokenizer.model").read_bytes() == tokenizer.path.read_bytes()


def test_split_is_a_stable_hash_of_the_text():
    texts = [f"document number {i}" for i in range(2000)]
    first = [in_validation(t, 0.1) for t in texts]
    assert first == [in_validation(t, 0.1) for t in texts]
    assert 0.07 < sum(first) / len(first) < 0.13
    assert not any(in_validation(t, 0.0) for t in texts)


def test_one_document_packs_into_blocks_in_order(ray_cluster, tokenizer, corpus, tmp_path):
    from pipelines.steps import prepare_data

    play = sorted(corpus.glob("*_gut.txt"))[0]
    out = prepare_data.run({"inputs": [str(play)], "seq_len": SEQ_LEN, "val_fraction": 0.0, "shard_blocks": 100,
                            "tokenizer": str(tokenizer.path), "output_dir": str(tmp_path / "np")}, {})
    manifest = read_manifest(out["data"])
    expected = len(tokenizer.encode(play.read_bytes().decode("utf-8"), bos=True, eos=True)) // (SEQ_LEN + 1)
    assert manifest["splits"]["train"]["blocks"] == expected and manifest["splits"]["validation"]["blocks"] == 0
    held = all_blocks(tmp_path / "np", "train")
    assert held.shape == (expected, SEQ_LEN + 1)
    ids = tokenizer.encode(play.read_bytes().decode("utf-8"), bos=True, eos=True)
    assert np.array_equal(held.ravel(), ids[:expected * (SEQ_LEN + 1)])  # one document: its tokens in order


def test_missing_or_empty_corpus_is_a_clear_error_before_ray_work(tmp_path):
    from pipelines.steps import prepare_data

    with pytest.raises(CorpusError, match=f"{tmp_path / 'nope'} does not exist.*fetch-demo"):
        list_corpus([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="is empty"):
        list_corpus([str(tmp_path / "empty")])
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(CorpusError, match=str(tmp_path / "empty")):
        prepare_data.run({"inputs": [str(tmp_path / "empty")], "tokenizer": "unused", "output_dir": str(tmp_path / "o")},
                         {})


class PeakMemory:
    """The driver's resident memory and the Ray object store's use (plus spilled bytes), sampled
    every 0.2 s in a thread while the block runs; peaks are above what was in use when it began."""

    def __enter__(self):
        import threading

        import psutil
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address(ray.get_runtime_context().gcs_address)  # this session's cluster, not another's
        process = psutil.Process()

        def sample() -> tuple[int, int]:
            stats = get_memory_info_reply(state).store_stats
            return process.memory_info().rss, stats.object_store_bytes_used + stats.spilled_bytes_total

        self.base = sample()
        self.peak = self.base
        self.stop = threading.Event()

        def watch():
            while not self.stop.wait(0.2):
                self.peak = tuple(map(max, self.peak, sample()))

        self.thread = threading.Thread(target=watch, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.driver, self.object_store = (p - b for p, b in zip(self.peak, self.base))


@pytest.mark.slow
def test_preparation_memory_does_not_grow_with_the_corpus(ray_cluster, tokenizer, corpus, tmp_path):
    """~10M and ~50M tokens: the same driver and object-store peaks (within 1.5x), 5x the tokens;
    with the 7B-70B specs' filters on (PII scrubbing, exact and near deduplication), so the
    filters keep the bound too."""
    from corral.data.demo import synthetic_corpus
    from pipelines.steps import prepare_data

    play = sorted(corpus.glob("*_gut.txt"))[0].read_text(encoding="utf-8")
    results = {}
    for name, n_words in (("small", 5_000_000), ("large", 25_000_000)):  # ~2.1 tokens a word
        src = synthetic_corpus(tmp_path / name, play, n_words, seed=len(name))
        with PeakMemory() as peak:
            out = prepare_data.run({"inputs": [str(src)], "seq_len": 255, "val_fraction": 0.01, "shard_blocks": 8192,
                                    "docs_per_batch": 256, "object_store_mb": 48, "scrub_pii": True,
                                    "dedup": {"exact": True, "near": True}, "tokenizer": str(tokenizer.path),
                                    "output_dir": str(tmp_path / f"{name}-data")}, {})
        manifest = read_manifest(out["data"])
        assert manifest["dedup"]["exact_duplicates"] == 0  # random sentences: nothing to remove, all of it compared
        tokens = manifest["splits"]["train"]["tokens"] + manifest["splits"]["validation"]["tokens"]
        results[name] = {"tokens": tokens, "driver_mib": peak.driver / 2**20, "object_store_mib": peak.object_store / 2**20}
        shutil.rmtree(src)
        shutil.rmtree(out["data"])
    small, large = results["small"], results["large"]
    print(f"\npeak memory while preparing: {results}; large/small: tokens {large['tokens'] / small['tokens']:.2f}, "
          f"driver {large['driver_mib'] / max(small['driver_mib'], 1):.2f}, "
          f"object store {large['object_store_mib'] / max(small['object_store_mib'], 1):.2f}")
    assert 8e6 < small["tokens"] < 13e6 and large["tokens"] > 4.5 * small["tokens"], results
    # 16 MiB of slack on the driver: its heap moves by a few MiB whatever the corpus
    assert large["driver_mib"] <= 1.5 * small["driver_mib"] + 16, results
    assert large["object_store_mib"] <= 1.5 * small["object_store_mib"], results
