"""The Llama 2 transformer (Touvron et al. 2023), in one file that reads like the paper.

Pre-normalisation with RMSNorm, SwiGLU feed-forward, rotary position embeddings, multi-head or
grouped-query attention, and a key/value cache for incremental decoding. Parameter names are
Meta's (`tok_embeddings`, `attention.wq`, `feed_forward.w1`, ...) so Meta checkpoints load 1:1.

Rotary embeddings rotate interleaved pairs (x0, x1), (x2, x3), ... as Meta's reference does;
Hugging Face rotates halves instead and permutes wq/wk to match (see `checkpoint.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from corral.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as Meta does) so bf16 training keeps the statistics exact;
        # F.rms_norm is x * rsqrt(mean(x^2) + eps) in one call, bit for bit.
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).type_as(x) * self.weight


def precompute_rope(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angle for every position and frequency: (max_seq_len, head_dim/2)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), freqs)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (bsz, seqlen, n_heads, head_dim) by per-position angles.

    cos/sin are (bsz, seqlen, head_dim/2): every row may sit at a different position. Each pair
    is a complex number times cos + i sin, as in Meta's reference: (x0 cos - x1 sin, x0 sin + x1 cos),
    in a third of the calls of writing that out (forward and backward bit for bit the same).
    """
    rotation = torch.complex(cos.float(), sin.float())[:, :, None, :]  # (bsz, seqlen, 1, head_dim/2)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (bsz, seqlen, n_heads, head_dim/2)
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)  # (bsz, seqlen, n_heads, head_dim)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(bsz, seqlen, n_kv_heads, head_dim) -> (bsz, seqlen, n_kv_heads * n_rep, head_dim)."""
    if n_rep == 1:
        return x
    return x.repeat_interleave(n_rep, dim=2)


class KVCache:
    """Keys and values of `n_slots` sequences, each up to `max_seq_len` tokens, for every layer.

    A slot is one sequence's row; rows decode at different positions in the same batch, so a
    continuous-batching engine can admit and retire sequences between steps. Attention runs in the
    cache's dtype: on a CPU keep it fp32 whatever the weights (PyTorch's bf16 attention kernel
    there is about 3x slower than its fp32 one at decode; measured in `benchmarks/serve_load.py`).
    """

    def __init__(self, config: ModelConfig, n_slots: int, max_seq_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.max_seq_len = max_seq_len or config.max_seq_len
        shape = (config.n_layers, n_slots, self.max_seq_len, config.kv_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def n_slots(self) -> int:
        return self.k.shape[1]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


@dataclass
class Layout:
    """Where the tokens of a batch sit and what each may attend to, built by the caller that owns
    the mode (SFT packing, reward-model branching) and passed in as data.

    positions (bsz, seqlen): each token's rotary position; None = 0, 1, 2, ... (or, with a cache,
    each row's continuation). mask (bsz, 1, seqlen, seqlen) bool, True where a query may attend to
    a key; None = causal. logits_at: (bsz, seqlen) bool keeps logits (n, vocab) only where True (a
    loss over a few positions skips the output layer everywhere else); "last" keeps the last
    position's (bsz, 1, vocab); None keeps all.
    """

    positions: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    logits_at: torch.Tensor | str | None = None


@dataclass
class CacheView:
    """The rows of a batch in a `KVCache`: row b continues the sequence in slot `slots[b]` from
    position `start[b]`, and its keys and values are written there.

    exact_rows: None attends over the batch's longest row at once. An int n attends row by row,
    each of the first n rows over exactly its own keys, and lets the rows after them (padding that
    only fills the batch) skip attention: a row's logits then do not depend on the other rows
    (continuous batching's "the same tokens as alone"), at some speed. `lengths` (exact rows only):
    each row's own tokens when the rows are right-padded to the longest (a batched prefill).
    """

    cache: KVCache
    slots: torch.Tensor
    start: torch.Tensor
    exact_rows: int | None = None
    lengths: list[int] | None = None
    _rows: list[tuple[int, int, int]] | None = field(default=None, init=False, repr=False)

    def rows(self, seqlen: int) -> list[tuple[int, int, int]]:
        """(slot, tokens, keys attended) of each exact row, read from the device once per forward."""
        if self._rows is None:  # host-device sync: once, not once per layer
            lengths = self.lengths or [seqlen] * self.exact_rows
            starts = self.start[: self.exact_rows].tolist()
            self._rows = [(slot, n, start + n) for slot, n, start in
                          zip(self.slots[: self.exact_rows].tolist(), lengths, starts)]
        return self._rows


class Attention(nn.Module):
    def __init__(self, layer_id: int, config: ModelConfig):
        super().__init__()
        self.layer_id = layer_id  # which layer of a KVCache is this attention's
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.n_rep = self.n_heads // self.n_kv_heads
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                cache: CacheView | None = None) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        xq = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        xk = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        xq, xk = apply_rope(xq, cos, sin), apply_rope(xk, cos, sin)

        if cache is None:  # training / full forward: causal, or the caller's mask
            out = self.attend(xq, xk, xv, mask, causal=mask is None)
        else:
            cache_k = cache.cache.k[self.layer_id]  # (n_slots, max_seq_len, n_kv_heads, head_dim)
            cache_v = cache.cache.v[self.layer_id]
            pos = cache.start[:, None] + torch.arange(seqlen, device=x.device)  # (bsz, seqlen)
            # Padding rows of a ragged batch may run past the end; their writes land in unused space.
            pos_w = pos.clamp(max=cache_k.shape[1] - 1)
            cache_k[cache.slots[:, None], pos_w] = xk.to(cache_k.dtype)
            cache_v[cache.slots[:, None], pos_w] = xv.to(cache_v.dtype)
            slots = cache.slots
            if cache.exact_rows is not None:
                # Each row over exactly its own keys: a length padded to the batch's longest row
                # changes the reduction order, and so the row's logits in the last bits.
                xq = xq.to(cache_k.dtype)
                out = xq.new_zeros(bsz, self.n_heads, seqlen, self.head_dim)  # padding: no attention
                for b, (slot, n, end) in enumerate(cache.rows(seqlen)):
                    out[b, :, :n] = self.row_attention(xq[b:b + 1, :n], cache_k[slot, :end], cache_v[slot, :end],
                                                       pos[b:b + 1, :n])[0]
                out = out.to(x.dtype)  # (bsz, n_heads, seqlen, head_dim)
            else:
                kv_len = int(pos.max()) + 1  # host-device sync: one scalar per layer call
                out = self.cached_attention(xq, cache_k, cache_v, slots, pos, kv_len)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))  # (bsz, seqlen, dim)

    def row_attention(self, xq, keys, values, pos):
        """One row's queries (1, seqlen, ...) at positions `pos` (1, seqlen) over its own cached keys
        and values (kv_len, n_kv_heads, head_dim), read in place (views of its slot, no copy)."""
        if xq.shape[1] == 1:  # one new token sees every key: no mask
            return self.attend(xq, keys[None], values[None], None, causal=False)
        mask = torch.arange(keys.shape[0], device=xq.device)[None, :] <= pos[0, :, None]  # (seqlen, kv_len)
        return self.attend(xq, keys[None], values[None], mask[None, None], causal=False)

    def cached_attention(self, xq, cache_k, cache_v, slots, pos, kv_len):
        """Queries at positions `pos` (bsz, seqlen) over the first kv_len cached keys of their
        slots, in the cache's dtype."""
        keys = cache_k[slots, :kv_len]  # (bsz, kv_len, n_kv_heads, head_dim)
        values = cache_v[slots, :kv_len]
        # query i of row b sees cache positions 0..positions[b] + i
        mask = torch.arange(kv_len, device=xq.device)[None, None, :] <= pos[:, :, None]
        # mask (bsz, 1, seqlen, kv_len)
        return self.attend(xq.to(keys.dtype), keys, values, mask[:, None], causal=False).to(xq.dtype)

    def attend(self, xq, keys, values, mask, causal):
        """Scaled dot-product attention -> (bsz, n_heads, seqlen, head_dim)."""
        keys, values = repeat_kv(keys, self.n_rep), repeat_kv(values, self.n_rep)
        return F.scaled_dot_product_attention(
            xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),  # (bsz, heads, seq, head_dim)
            attn_mask=mask, is_causal=causal,
        )


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, config: ModelConfig):
        super().__init__()
        self.attention = Attention(layer_id, config)
        self.feed_forward = FeedForward(config.dim, config.ffn_dim)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                cache: CacheView | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    activation_checkpointing = False  # training sets it (DeepSpeedConfig.activation_checkpointing)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, config) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        cos, sin = precompute_rope(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, seed: int | None = None) -> "Transformer":
        """Seeded initial weights (`seeded_init`)."""
        fill_parameters(self, seeded_init(seed))
        return self

    def forward(self, tokens: torch.Tensor, layout: Layout | None = None,
                cache: CacheView | None = None) -> torch.Tensor:
        """tokens (bsz, seqlen) -> logits (bsz, seqlen, vocab_size), fp32.

        Without a layout or a cache this is the plain causal forward. `layout` says where tokens
        sit, what they attend to and which logits to keep (see `Layout`); `cache` continues each
        row's sequence in a KV cache (see `CacheView`).
        """
        layout = layout or Layout()
        bsz, seqlen = tokens.shape
        pos = layout.positions
        if pos is None and cache is not None:
            pos = cache.start[:, None] + torch.arange(seqlen, device=tokens.device)  # (bsz, seqlen)
        elif pos is None:
            if seqlen > self.config.max_seq_len:
                raise ValueError(f"sequence of {seqlen} tokens exceeds max_seq_len {self.config.max_seq_len}")
            pos = torch.arange(seqlen, device=tokens.device).expand(bsz, seqlen)
        pos = pos.long().clamp(max=self.config.max_seq_len - 1)  # only padding runs past the end
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (bsz, seqlen, head_dim/2)

        h = self.tok_embeddings(tokens)  # (bsz, seqlen, dim)
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                # keep only the block's input; backward runs the block again (non-reentrant: works
                # with ZeRO-3's parameter hooks and with inputs that need no grad)
                h = checkpoint(layer, h, cos, sin, layout.mask, cache, use_reentrant=False)
            else:
                h = layer(h, cos, sin, layout.mask, cache)
        if isinstance(layout.logits_at, str):  # "last"
            h = h[:, -1:]  # (bsz, 1, dim)
        elif layout.logits_at is not None:
            h = h[layout.logits_at]  # (n, dim)
        return self.output(self.norm(h)).float()


# -- filling parameters ---------------------------------------------------------------------------
WeightSource = Callable[[str, torch.Size], torch.Tensor]  # (name, shape) -> that parameter's values


def seeded_init(seed: int | None) -> WeightSource:
    """Initial weights at PyTorch's default scales: embeddings N(0, 1), each matrix
    U(+-1/sqrt(fan_in)), norms 1; one generator drawn in parameter order, so the same seed gives
    the same model however it is built.

    The tiny preset learns the task suite markedly faster from these than from GPT-2's N(0, 0.02)
    (docs/design-notes.md, "Initialisation").
    """
    gen = torch.Generator().manual_seed(seed) if seed is not None else None

    def init(name: str, shape: torch.Size) -> torch.Tensor:
        if len(shape) == 1:
            return torch.ones(shape)
        if name == "tok_embeddings.weight":
            return torch.randn(shape, generator=gen)
        return (torch.rand(shape, generator=gen) * 2 - 1) * shape[1] ** -0.5

    return init


def flat_slice(weights: WeightSource, name: str, shape: torch.Size, start: int, end: int) -> torch.Tensor:
    """Elements [start, end) of a parameter's flattened values: read alone where the source can
    (a checkpoint's `WeightReader.slice`), else cut from the whole tensor."""
    if hasattr(weights, "slice"):
        return weights.slice(name, shape, start, end)
    return weights(name, shape).flatten()[start:end]


def fill_parameters(model: nn.Module, weights: WeightSource) -> None:
    """Copy `weights(name, shape)` into every parameter, in order, one tensor at a time."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights(name, p.shape))
