"""Pretraining data preparation on a real Ray cluster: packing, splits, skips, manifest, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corral.data.pretraining import (IN_MEMORY_BYTES, CorpusError, in_validation, list_corpus, load_packed,
                                     read_manifest)

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


def read_in_order(data_dir, split, in_memory_bytes=IN_MEMORY_BYTES) -> np.ndarray:
    """Every block of a split in dataset order, as training reads it: held in memory (the default
    for small splits), or streamed from the shard files with `in_memory_bytes=0`."""
    from ray.data.dataset import MaterializedDataset

    ds = load_packed(data_dir, split, in_memory_bytes)
    assert isinstance(ds, MaterializedDataset) == (in_memory_bytes > 0)
    ds.context.execution_options.preserve_order = True  # as fit() asks of Ray Train
    return np.concatenate([b["tokens"] for b in ds.iter_batches(batch_size=None)])


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

    blocks = read_in_order(out["data"], "train")
    assert blocks.shape == (splits["train"]["blocks"], SEQ_LEN + 1) and blocks.dtype == np.int32
    assert blocks.min() >= 0 and blocks.max() < tokenizer.vocab_size
    flat = blocks.ravel()
    assert (flat == tokenizer.eos_id).sum() >= 1 and (flat == tokenizer.bos_id).sum() >= 1  # no padding id at all
    assert (tmp_path / "data" / "tokenizer.model").read_bytes() == tokenizer.path.read_bytes()
    # a split too large to hold in memory streams from the files: the same blocks
    assert np.array_equal(read_in_order(out["data"], "train", in_memory_bytes=0), blocks)


def test_split_is_a_stable_hash_of_the_text():
    texts = [f"document number {i}" for i in range(2000)]
    first = [in_validation(t, 0.1) for t in texts]
    assert first == [in_validation(t, 0.1) for t in texts]
    assert 0.07 < sum(first) / len(first) < 0.13
    assert not any(in_validation(t, 0.0) for t in texts)


def test_numpy_output_reads_back_the_same(ray_cluster, tokenizer, corpus, tmp_path):
    from pipelines.steps import prepare_data

    play = sorted(corpus.glob("*_gut.txt"))[0]
    out = prepare_data.run({"inputs": [str(play)], "seq_len": SEQ_LEN, "val_fraction": 0.0, "output_format": "numpy",
                            "tokenizer": str(tokenizer.path), "output_dir": str(tmp_path / "np")}, {})
    manifest = read_manifest(out["data"])
    expected = len(tokenizer.encode(play.read_bytes().decode("utf-8"), bos=True, eos=True)) // (SEQ_LEN + 1)
    assert manifest["splits"]["train"]["blocks"] == expected
    held = read_in_order(out["data"], "train")
    assert held.shape == (expected, SEQ_LEN + 1) and held.dtype == np.int32
    assert np.array_equal(read_in_order(out["data"], "train", in_memory_bytes=0), held)  # streamed from the files


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
