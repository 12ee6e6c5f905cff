"""The training data reader every stage shares: rank r of W reads only its own rows, and its
position is one world-size-independent counter, so a resume seeks instead of re-reading.

A source is a list of shards of equal-width rows (`sizes`, `read(shard, rows)`): the token
shards of a prepared pretraining split (`corral.data.pretraining.TokenShards`, memory-mapped) or
a stage's small in-memory columns (`ColumnRows`, one shard). Every epoch has one global order of
the source's rows, a function of (seed, epoch) only:

- the shards are permuted with a generator seeded by (seed, epoch);
- consecutive runs of `MIX_SHARDS` shards in that order form a window, and the rows of a window
  are permuted together (seeded by (seed, epoch, window)), so one global batch mixes the
  documents of several shards, each written from a different part of the corpus.

Global batch k of an epoch is the order's rows [k*B, (k+1)*B) with B = micro_batch_size * W;
rank r takes rows [k*B + r*mb, k*B + (r+1)*mb). The position saved in a checkpoint is
(epoch, sequences consumed in the epoch): any W can continue from it, reading exactly the rows
after it, so changing W between runs neither repeats nor skips a sequence within the epoch. Only
the tail of an epoch shorter than one global batch is left out, as in any epoch.

Locating a row costs the epoch's shard permutation (one int per shard) and one window's row
permutation (MIX_SHARDS shards' rows): the memory does not grow with the corpus.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

# Shards whose rows are mixed together: a global batch draws on this many parts of the corpus.
# Part of the order: changing it changes which rows a saved position points past.
MIX_SHARDS = 8


class ColumnRows:
    """A stage's rows held in memory (SFT, reward pairs): equal-length numpy columns, one shard.

    The stage shuffles its records itself (with the loop's seed), so the reader keeps their order.
    """

    shuffle = False

    def __init__(self, columns: dict[str, np.ndarray]):
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns of different lengths: { {k: len(v) for k, v in columns.items()} }")
        self.columns = {k: np.asarray(v) for k, v in columns.items()}
        self.sizes = [lengths.pop()]
        self.row_bytes = sum(v[0].nbytes if v.ndim > 1 else v.itemsize for v in self.columns.values())

    def __len__(self) -> int:
        return self.sizes[0]

    def read(self, shard: int, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[rows] for k, v in self.columns.items()}


class EpochOrder:
    """The global row order of one epoch: global index -> (shard, row in shard)."""

    def __init__(self, sizes: list[int], seed: int, epoch: int, shuffle: bool):
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        sizes = np.asarray(sizes, dtype=np.int64)
        self.shards = np.random.default_rng([seed, epoch]).permutation(len(sizes)) if shuffle \
            else np.arange(len(sizes))
        ordered = sizes[self.shards]
        self.starts = np.concatenate([[0], np.cumsum(ordered)])  # global index where each ordered shard starts
        self.window_starts = self.starts[::MIX_SHARDS]  # and each window (the last entry: the total, if aligned)
        self._window: tuple[int, np.ndarray] | None = None  # the last window's row permutation

    def window_perm(self, w: int) -> np.ndarray:
        if self._window is None or self._window[0] != w:
            n = int(self.starts[min((w + 1) * MIX_SHARDS, len(self.shards))] - self.window_starts[w])
            perm = np.random.default_rng([self.seed, self.epoch, w + 1]).permutation(n) if self.shuffle \
                else np.arange(n)
            self._window = (w, perm)
        return self._window[1]

    def locate(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard id, row within it) of each global index of the epoch."""
        windows = np.searchsorted(self.window_starts, index, side="right") - 1
        within = np.empty_like(index)
        for w in np.unique(windows):
            at = windows == w
            within[at] = self.window_perm(int(w))[index[at] - self.window_starts[w]] + self.window_starts[w]
        k = np.searchsorted(self.starts, within, side="right") - 1  # position of the shard in the order
        return self.shards[k], within - self.starts[k]


class SequenceReader:
    """This rank's micro-batches of a source, epoch after epoch, reading only its own rows.

    State (`state_dict`): {"epoch", "consumed"}: sequences of the epoch handed to all ranks
    together. Counters `rows_read` and `bytes_read` say what this rank has read since it started.
    """

    def __init__(self, source, micro_batch_size: int, rank: int, world_size: int, seed: int = 0):
        self.source, self.mb, self.rank, self.world_size, self.seed = source, micro_batch_size, rank, world_size, seed
        self.epoch, self.consumed = 0, 0
        self.rows_read, self.bytes_read = 0, 0
        self._order: EpochOrder | None = None

    def __len__(self) -> int:
        return sum(self.source.sizes)

    def order(self, epoch: int) -> EpochOrder:
        if self._order is None or self._order.epoch != epoch:
            self._order = EpochOrder(self.source.sizes, self.seed, epoch, self.source.shuffle)
        return self._order

    def read(self, epoch: int, index: np.ndarray) -> dict[str, torch.Tensor]:
        """The rows at these global indices of `epoch`, in that order, as tensors."""
        shards, rows = self.order(epoch).locate(index)
        parts = [(shard, self.source.read(int(shard), rows[shards == shard])) for shard in np.unique(shards)]
        self.rows_read += len(index)
        self.bytes_read += len(index) * self.source.row_bytes
        out = {}
        for key in parts[0][1]:
            column = np.empty((len(index), *parts[0][1][key].shape[1:]), dtype=parts[0][1][key].dtype)
            for shard, part in parts:
                column[shards == shard] = part[key]
            out[key] = torch.from_numpy(column)
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        per_batch = self.mb * self.world_size
        if len(self) < per_batch:
            raise ValueError(f"the dataset holds {len(self)} sequences, fewer than one global batch "
                             f"({self.mb} x {self.world_size} workers)")
        while True:
            while self.consumed + per_batch <= len(self):
                start = self.consumed + self.rank * self.mb
                batch = self.read(self.epoch, np.arange(start, start + self.mb))
                self.consumed += per_batch
                yield batch
            self.epoch, self.consumed = self.epoch + 1, 0

    def take(self, n: int) -> list[dict[str, torch.Tensor]]:
        """The next `n` micro-batches."""
        stream = iter(self)
        return [next(stream) for _ in range(n)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = state["epoch"], state["consumed"]
