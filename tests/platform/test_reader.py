"""The training data reader: each rank reads only its share, a position seeks, and a change of
world size between runs neither repeats nor skips a sequence within the epoch.

Real prepared shards (12 plays, one shard per play) and a source of numbered rows whose ids say
which sequence each rank got.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from corral.data.reader import MIX_SHARDS, ColumnRows, EpochOrder, SequenceReader

SEQ_LEN = 64


class NumberedRows:
    """A source of `sizes` shards whose rows are their global ids: what a reader hands out names
    exactly which sequences it read."""

    shuffle = True
    row_bytes = 8

    def __init__(self, sizes: list[int]):
        self.sizes = sizes
        self.starts = np.concatenate([[0], np.cumsum(sizes)])

    def read(self, shard: int, rows: np.ndarray) -> dict[str, np.ndarray]:
        assert rows.max() < self.sizes[shard]
        return {"id": self.starts[shard] + rows}


@pytest.fixture(scope="module")
def shards(ray_cluster, corpus, tokenizer_dir, tmp_path_factory):
    """12 plays prepared one document per batch: about a dozen shards of a few hundred blocks."""
    from corral.data.pretraining import read_manifest
    from tests.conftest import prepare_plays

    out = prepare_plays(corpus, tokenizer_dir, tmp_path_factory.mktemp("prepared"), seq_len=SEQ_LEN,
                        val_fraction=0.1, docs_per_batch=1, shard_blocks=64)
    assert len(read_manifest(out)["splits"]["train"]["shards"]) > MIX_SHARDS  # more than one window
    return out


def ids(batches) -> list[int]:
    return [i for b in batches for i in b["id"].tolist()]


def test_every_epoch_order_is_a_permutation_of_all_rows():
    sizes = [int(n) for n in np.random.default_rng(0).integers(1, 40, size=3 * MIX_SHARDS + 3)]
    total = sum(sizes)
    source = NumberedRows(sizes)
    orders = []
    for epoch in (0, 1):
        order = EpochOrder(sizes, seed=7, epoch=epoch, shuffle=True)
        shard, row = order.locate(np.arange(total))
        got = source.starts[shard] + row
        assert sorted(got.tolist()) == list(range(total))  # each row exactly once
        orders.append(got)
    assert not np.array_equal(orders[0], orders[1]), "each epoch has its own order"
    assert np.array_equal(EpochOrder(sizes, 7, 0, True).locate(np.arange(total))[1],
                          EpochOrder(sizes, 7, 0, True).locate(np.arange(total))[1]), "and it is reproducible"
    shard, row = EpochOrder(sizes, 7, 0, shuffle=False).locate(np.arange(total))
    assert (source.starts[shard] + row).tolist() == list(range(total))  # unshuffled: the stored order


def test_two_ranks_read_half_each_and_see_every_sequence_once(shards):
    from corral.data.pretraining import TokenShards, read_manifest

    manifest = read_manifest(shards)
    everything = np.concatenate([np.load(shards / s["path"]) for s in manifest["splits"]["train"]["shards"]])
    source = TokenShards(shards, "train")
    n, mb = len(everything), 4
    steps = n // (mb * 2)  # the whole epoch but its tail
    ranks = [SequenceReader(source, mb, rank, 2, seed=3) for rank in (0, 1)]
    got = [np.concatenate([b["tokens"].numpy() for b in r.take(steps)]) for r in ranks]

    split_bytes = sum((shards / s["path"]).stat().st_size for s in manifest["splits"]["train"]["shards"])
    for r in ranks:
        assert r.rows_read == steps * mb and r.bytes_read == steps * mb * (SEQ_LEN + 1) * 2  # uint16
        assert r.bytes_read == pytest.approx(split_bytes / 2, rel=0.03)  # half the split, headers and tail aside
        assert r.state_dict() == {"epoch": 0, "consumed": steps * mb * 2}
    seen = Counter(map(bytes, np.concatenate(got).astype(np.uint16)))
    tail = SequenceReader(source, mb, 0, 2, seed=3).read(0, np.arange(steps * mb * 2, n))["tokens"].numpy()
    # together with the tail no global batch could hold, every block of the split exactly once
    assert seen + Counter(map(bytes, tail.astype(np.uint16))) == Counter(map(bytes, everything))
    assert len(tail) < mb * 2


def test_a_resumed_reader_reads_only_what_is_left_and_the_same_batches(shards):
    from corral.data.pretraining import TokenShards

    source = TokenShards(shards, "train")
    uninterrupted = SequenceReader(source, 4, 1, 2, seed=0)
    expected = [b["tokens"] for b in uninterrupted.take(30)]  # past an epoch's end into the next

    first = SequenceReader(source, 4, 1, 2, seed=0)
    first.take(17)
    position = first.state_dict()
    resumed = SequenceReader(TokenShards(shards, "train"), 4, 1, 2, seed=0)
    resumed.load_state_dict(position)
    got = [b["tokens"] for b in resumed.take(13)]
    assert all(np.array_equal(a, b) for a, b in zip(got, expected[17:])), "the batches an uninterrupted run got"
    assert resumed.rows_read == 13 * 4  # nothing before the position read again, nothing ahead either


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (3, 2)])
def test_a_position_saved_on_one_world_size_resumes_on_another(before, after):
    source = NumberedRows([int(n) for n in np.random.default_rng(1).integers(5, 30, size=2 * MIX_SHARDS + 1)])
    total, mb = sum(source.sizes), 3
    first = [SequenceReader(source, mb, r, before, seed=5) for r in range(before)]
    seen = [ids(reader.take(7)) for reader in first]
    position = first[0].state_dict()
    assert all(r.state_dict() == position == {"epoch": 0, "consumed": 7 * mb * before} for r in first)

    second = [SequenceReader(source, mb, r, after, seed=5) for r in range(after)]
    for reader in second:
        reader.load_state_dict(position)
    left = (total - position["consumed"]) // (mb * after)  # whole global batches left in the epoch
    seen += [ids(reader.take(left)) for reader in second]
    assert all(r.state_dict() == {"epoch": 0, "consumed": position["consumed"] + left * mb * after} for r in second)
    ids_seen = [i for rank in seen for i in rank]
    assert len(ids_seen) == len(set(ids_seen)), "no sequence twice in the epoch"
    assert total - len(ids_seen) < mb * after, "and none left out but the tail no global batch could hold"
    # the next batch is the next epoch's first
    next(iter(second[0]))
    assert second[0].state_dict() == {"epoch": 1, "consumed": mb * after}


def test_in_memory_rows_keep_the_stage_order_and_hand_out_whole_global_batches():
    rows = ColumnRows({"i": np.arange(50), "pair": np.arange(100).reshape(50, 2)})  # 6 global batches of 2 x 4
    ranks = [SequenceReader(rows, micro_batch_size=4, rank=r, world_size=2) for r in (0, 1)]
    got = [[b["i"].tolist() for b in r.take(7)] for r in ranks]  # 7 > 6: the 7th starts the second epoch
    assert got[0] == [list(range(8 * k, 8 * k + 4)) for k in range(6)] + [[0, 1, 2, 3]]
    assert got[1] == [list(range(8 * k + 4, 8 * k + 8)) for k in range(6)] + [[4, 5, 6, 7]]
    assert ranks[0].state_dict() == {"epoch": 1, "consumed": 8}
    resumed = SequenceReader(rows, micro_batch_size=4, rank=1, world_size=2)
    resumed.load_state_dict({"epoch": 0, "consumed": 24})
    batches = resumed.take(4)
    assert [b["i"].tolist() for b in batches] == [[28, 29, 30, 31], [36, 37, 38, 39], [44, 45, 46, 47], [4, 5, 6, 7]]
    assert batches[0]["pair"].tolist() == [[56, 57], [58, 59], [60, 61], [62, 63]]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        SequenceReader(ColumnRows({"i": np.arange(7)}), 4, 0, 2).take(1)
