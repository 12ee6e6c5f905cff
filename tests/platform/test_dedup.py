"""Duplicates out of the pretraining data: planted exact copies (case and whitespace variants) and
near copies (a few words changed) dropped, distinct and merely similar documents kept, the counts
and the share of tokens removed exact, through prepare_data on Ray Data (manifest, MLflow), and the
same documents dropped whatever the number of Ray Data blocks."""

from __future__ import annotations

import json
import random
import re

import numpy as np

from corral.config import DedupConfig
from corral.data.dedup import exact_hash, shingles

ORIGINALS, EXACT, NEAR, SIMILAR = 16, 5, 5, 3  # SIMILAR: 20 words of 300 changed, Jaccard ~0.5: kept


def planted_corpus(play: str, seed: int) -> dict[str, list[str]]:
    """Documents of 300 words of `play`: distinct originals; exact copies (same text, upper-cased,
    or with its whitespace changed); near copies (3 words changed, and a copy of that copy with 3
    more: a chain, one cluster); similar documents (20 words changed: kept). Changed words
    are `zqx<n>` markers, so the output shows which version was kept."""
    rng = random.Random(seed)
    vocab = sorted(set(re.findall(r"[a-z]+", play.lower())))
    originals = [" ".join(rng.choice(vocab) for _ in range(300)) + "." for _ in range(ORIGINALS)]
    marker = iter(f"zqx{i}" for i in range(10_000))

    def changed(text: str, n: int) -> str:
        words = text.split(" ")
        for at in rng.sample(range(len(words) - 1), n):
            words[at] = next(marker)
        return " ".join(words)

    exact = [originals[0].upper(), "  \n".join(originals[1].split(" ")), originals[2], originals[2].title(),
             "\t" + originals[3] + "\n\n"][:EXACT]
    near = [changed(originals[4], 3), changed(originals[5], 3), changed(originals[6], 3)]
    near += [changed(near[0], 3), changed(originals[7], 2)][:NEAR - len(near)]
    similar = [changed(originals[8 + i], 20) for i in range(SIMILAR)]
    return {"originals": originals, "exact": exact, "near": near, "similar": similar}


def write_corpus(root, docs: dict[str, list[str]]):
    """Originals first (`a.jsonl`: the smallest ids, so they are the ones kept), the rest after."""
    root.mkdir()
    (root / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs["originals"]))
    rest = docs["exact"] + docs["near"] + docs["similar"]
    (root / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rest))
    return root


def test_normalised_hash_and_shingles():
    assert exact_hash("The  Quick\nbrown fox ") == exact_hash("the quick brown fox")
    assert exact_hash("the quick brown fox.") != exact_hash("the quick brown fox")
    assert sorted(shingles("A b, c d e f", 5)) == [b"a b c d e", b"b c d e f"]
    assert shingles("two words", 5) == [b"two words"]


def test_prepare_data_drops_planted_duplicates_counts_exact(ray_cluster, mlflow_server, tokenizer, corpus, tmp_path):
    from corral import tracking
    from corral.data.pretraining import read_manifest
    from pipelines.steps import prepare_data

    play = sorted(corpus.glob("*_gut.txt"))[0].read_text(encoding="utf-8")
    docs = planted_corpus(play, seed=0)
    src = write_corpus(tmp_path / "corpus", docs)
    run_id = tracking.start_run("test-dedup", "prepare_data")
    out = prepare_data.run({"inputs": [str(src)], "seq_len": 64, "val_fraction": 0.0, "docs_per_batch": 1000,
                            "dedup": {"exact": True, "near": True}, "tokenizer": str(tokenizer.path),
                            "output_dir": str(tmp_path / "data")}, {"run_id": run_id})
    tracking.flush()
    manifest = read_manifest(out["data"])
    assert manifest["documents"] == {"documents": ORIGINALS + SIMILAR, "skipped_exact_duplicate": EXACT,
                                     "skipped_near_duplicate": NEAR}
    kept = docs["originals"] + docs["similar"]
    kept_tokens = sum(len(tokenizer.encode(t, bos=True, eos=True)) for t in kept)
    removed = sum(len(tokenizer.encode(t, bos=True, eos=True)) for t in docs["exact"] + docs["near"])
    splits = manifest["splits"]
    assert splits["train"]["tokens"] + splits["validation"]["tokens"] + manifest["dropped_tokens"] == kept_tokens
    dedup = manifest["dedup"]
    assert (dedup["exact_duplicates"], dedup["near_duplicates"], dedup["tokens_removed"]) == (EXACT, NEAR, removed)
    assert dedup["tokens_removed_share"] == removed / (removed + kept_tokens)
    assert (dedup["threshold"], dedup["num_perm"], dedup["shingle_words"]) == (0.8, 128, 5)
    assert not (tmp_path / "data" / ".dedup").exists()  # the signatures and drop lists are gone
    metrics = {"skipped_exact_duplicate": EXACT, "skipped_near_duplicate": NEAR, "dedup_tokens_removed": removed,
               "dedup_tokens_removed_share": dedup["tokens_removed_share"]}
    for key, value in metrics.items():
        assert tracking.metric_history(run_id, key) == [(0, float(value))]

    # the originals were kept, not their copies: no copy's markers or upper case in the tokens
    blocks = np.concatenate([np.load(tmp_path / "data" / s["path"]) for s in splits["train"]["shards"]])
    text = tokenizer.decode(blocks.ravel().tolist())
    found = set(re.findall(r"zqx\d+", text))
    assert all(found & set(re.findall(r"zqx\d+", t)) for t in docs["similar"])  # each (a batch's tail may be cut)
    assert not found & {m for t in docs["near"] for m in re.findall(r"zqx\d+", t)}
    assert docs["originals"][0][:200] in text and docs["originals"][0][:200].upper() not in text


def test_duplicates_found_are_the_same_with_1_and_4_blocks(ray_cluster, corpus, tmp_path):
    import ray

    from corral.data.dedup import find_duplicates

    play = sorted(corpus.glob("*_gut.txt"))[0].read_text(encoding="utf-8")
    docs = planted_corpus(play, seed=1)
    texts = docs["originals"] + docs["exact"] + docs["near"] + docs["similar"]
    rows = [{"id": j, "text": t, "status": "ok", "url": ""} for j, t in enumerate(texts)]
    rows.reverse()  # the order read must not matter either
    exact_ids = set(range(ORIGINALS, ORIGINALS + EXACT))
    near_ids = set(range(ORIGINALS + EXACT, ORIGINALS + EXACT + NEAR))
    cfg = DedupConfig(exact=True, near=True)
    found = {}
    for n_blocks in (1, 4):
        ds = ray.data.from_items(rows, override_num_blocks=n_blocks)
        assert ds.materialize().num_blocks() == n_blocks
        drops = find_duplicates(ds, cfg, tmp_path / f"work-{n_blocks}").take_all()
        found[n_blocks] = sorted((int(r["id"]), bool(r["near"])) for r in drops)
    assert found[1] == found[4]
    assert {i for i, near in found[1] if not near} == exact_ids and {i for i, near in found[1] if near} == near_ids

    # near only: the exact copies are near copies too (similarity 1); exact only: the near copies stay
    near_only = find_duplicates(ray.data.from_items(rows), DedupConfig(near=True), tmp_path / "near").take_all()
    assert {int(r["id"]) for r in near_only} == exact_ids | near_ids and all(r["near"] for r in near_only)
    exact_only = find_duplicates(ray.data.from_items(rows), DedupConfig(exact=True), tmp_path / "exact").take_all()
    assert {int(r["id"]) for r in exact_only} == exact_ids
