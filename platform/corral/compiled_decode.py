"""A decode step compiled once for a CPU: the whole model's one-token forward as one TorchInductor graph.

At batch 1 an eager decode step is mostly overhead: ~300 small tensor operations, each dispatched
from Python, and 43 matrix-vector products through oneDNN, which reads the weights at about half
the memory bandwidth. `torch.compile` (inductor, `max-autotune`) captures the step once per batch
size, fuses the norms, rotary embeddings and residuals into a few C++ loops, and generates its own
matrix-multiply kernels for the frozen weights (its CPP GEMM template), which read them near the
bandwidth at a few rows (`benchmarks/serve_load.py`: about 2x the eager step at batch 1).

Batch invariance by construction: the generated kernels compute each row alone (measured: a row's
logits are bit-identical at 1, 2, 4, 8 and 32 rows), so a row's tokens do not depend on the batch
and no padding row is needed. Only the CPP template is allowed (`max_autotune_gemm_backends`),
because the autotuner would otherwise pick oneDNN at some batch sizes and the template at others.

The attention (cache write, then each row over exactly its own keys) is one opaque operator,
`corral::decode_attention`, since rows attend over different lengths; it runs eagerly inside the
graph. The price: a compile per batch size at start (10-40 s each on 2 cores; inductor caches
them on disk for later starts), a reordered copy of the weights per compiled size (three), and,
on a CPU without AMX, slower steps at many rows (the template's kernels there multiply in fp32):
batches run in chunks of `ROWS` rows.
"""

from __future__ import annotations

import logging
import time
import types

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch import nn

from corral.model import KVCache, Transformer

log = logging.getLogger(__name__)

ROWS = 4  # rows per compiled call: on a 2-core AVX-512 CPU, 8 rows cost 2.6x what 4 do (small preset)
# weights as constants (what the GEMM template needs), and only the template: see above. Set while
# compiling (at construction): inductor reads them then, and ignores them in torch.compile's options.
# Never split a row's reduction across threads (inductor's default, pinned against its env var).
INDUCTOR_CONFIG = {"freezing": True, "max_autotune_gemm_backends": "CPP", "cpp.enable_concat_linear": True,
                   "cpp.gemm_max_k_slices": 1}

_LIB = torch.library.Library("corral", "DEF")
_LIB.define("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) cache_k, Tensor(b!) cache_v, int layer, "
            "Tensor slots, Tensor positions, Tensor rows) -> Tensor")


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor,
                     cache_v: torch.Tensor, layer: int, slots: torch.Tensor, positions: torch.Tensor,
                     rows: torch.Tensor) -> torch.Tensor:
    """Write each row's new key and value (bsz, kv_heads, head_dim) at its slot and position in
    `layer` of the cache, then attend each of the first `rows` rows' queries (bsz, heads, 1,
    head_dim) over exactly its own keys; the rows after them (padding) get zeros."""
    cache_k, cache_v = cache_k[layer], cache_v[layer]  # (n_slots, max_seq_len, kv_heads, head_dim)
    cache_k.index_put_((slots, positions), k.to(cache_k.dtype))
    cache_v.index_put_((slots, positions), v.to(cache_v.dtype))
    q = q.to(cache_k.dtype)
    n = rows.item()
    out = None if n == len(q) == 1 else torch.zeros_like(q)
    for b, (slot, pos) in enumerate(zip(slots[:n].tolist(), positions[:n].tolist())):
        keys = cache_k[slot, : pos + 1].transpose(0, 1)[None]  # (1, kv_heads, pos + 1, head_dim), a view
        values = cache_v[slot, : pos + 1].transpose(0, 1)[None]
        row = F.scaled_dot_product_attention(q[b:b + 1], keys, values, enable_gqa=True)
        if out is None:  # one row, nothing to pad
            return row
        out[b] = row[0]
    return out


_LIB.impl("decode_attention", decode_attention, "CPU")


@torch.library.register_fake("corral::decode_attention")
def _decode_attention_shape(q, k, v, cache_k, cache_v, layer, slots, positions, rows):
    return torch.empty_like(q)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of interleaved pairs, written out in real numbers (inductor fuses it):
    x (bsz, heads, head_dim), cos/sin (bsz, 1, head_dim/2) -> fp32."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(-2)


class DecodeStep(nn.Module):
    """One token per row through `model`: tokens (bsz,) at `positions` (bsz,) continuing the
    sequences in cache `slots` (bsz,), of which the first `rows` (a 0-d tensor) are real ->
    logits (bsz, vocab), fp32. The cache's tensors are inputs, written in place."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
                cache_k: torch.Tensor, cache_v: torch.Tensor) -> torch.Tensor:
        m, bsz = self.model, tokens.shape[0]
        cos, sin = m.rope_cos[positions][:, None], m.rope_sin[positions][:, None]  # (bsz, 1, head_dim/2)
        h = m.tok_embeddings(tokens)  # (bsz, dim)
        for i, layer in enumerate(m.layers):
            a = layer.attention
            x = layer.attention_norm(h)
            q = rotate(a.wq(x).view(bsz, a.n_heads, a.head_dim), cos, sin)
            k = rotate(a.wk(x).view(bsz, a.n_kv_heads, a.head_dim), cos, sin)
            v = a.wv(x).view(bsz, a.n_kv_heads, a.head_dim)
            out = torch.ops.corral.decode_attention(q[:, :, None], k, v, cache_k, cache_v, i,
                                                    slots, positions, rows)  # (bsz, heads, 1, head_dim)
            h = h + a.wo(out.to(h.dtype).view(bsz, -1))
            h = h + layer.feed_forward(layer.ffn_norm(h))
        return m.output(m.norm(h)).float()


class CompiledDecode:
    """`DecodeStep` compiled for 1, 2 and `ROWS` rows (at construction: a request's first steps do not
    wait for it); a larger batch runs in chunks of `ROWS`. With `batch_invariant`, construction
    also checks that a row gets the same bits at each of those sizes on this CPU (inductor picks
    its kernels per host and shape), and refuses to serve if not."""

    def __init__(self, model: Transformer, cache: KVCache, scratch_slot: int, batch_invariant: bool = True):
        param = next(model.parameters())
        if param.device.type != "cpu":
            raise ValueError(f"compiled decoding is for CPUs; this model is on {param.device} "
                             f"(on a GPU, serve with engine: vllm)")
        self.cache, self.scratch_slot = cache, scratch_slot
        # Dynamo keeps compiled graphs per code object: each engine's forward gets a code object of
        # its own, or a few engines in one process would share (and overrun) one cache. The
        # forward, not the module: one call layer less on every step.
        forward = DecodeStep.forward
        forward = types.FunctionType(forward.__code__.replace(), forward.__globals__, forward.__name__)
        self.step = torch.compile(types.MethodType(forward, DecodeStep(model)), mode="max-autotune",
                                  fullgraph=True, dynamic=False)
        # the engine steps in inference mode, and the compiled graphs are for that mode's tensors
        with torch.inference_mode():
            self.rows = [torch.tensor(n) for n in range(ROWS + 1)]
        with inductor_config.patch(INDUCTOR_CONFIG):
            for size in sorted({1, 2, ROWS}):  # in the scratch slot
                start = time.perf_counter()
                self._run([0] * size, [scratch_slot] * size, [0] * size)
                log.info("compiled the decode step for %d row(s) in %.0f s", size, time.perf_counter() - start)
        if batch_invariant:
            with torch.compiler.set_stance("fail_on_recompile"):
                self._check_rows_alone()

    @torch.inference_mode()
    def _check_rows_alone(self) -> None:
        """One row (slot 0, free at construction) beside different padding rows, at each size."""
        logits = []
        for size in sorted({1, 2, ROWS}):
            tokens = torch.arange(size) * 7 + 3  # a different token in every row
            slots = torch.tensor([0] + [self.scratch_slot] * (size - 1))
            logits.append(self.step(tokens, slots, torch.zeros(size, dtype=torch.long), self.rows[1],
                                    self.cache.k, self.cache.v)[0])
        if not all(torch.equal(logits[0], other) for other in logits[1:]):
            raise ValueError("the compiled decode step gives a row different bits at different batch sizes on "
                             "this CPU, so batch invariance cannot hold: set compile_decode: false, or "
                             "batch_invariant: false")

    def __call__(self, tokens: list[int], slots: list[int], positions: list[int]) -> torch.Tensor:
        """Logits (len(tokens), vocab) for one new token per row. Never compiles again: a
        recompile without INDUCTOR_CONFIG would change the kernels, so it is an error. The graphs
        differ only in their batch size, and every call comes from `_run`, so only the guards
        that tell them apart are checked (~0.1 ms a step less)."""
        with torch.compiler.set_stance("fail_on_recompile", skip_guard_eval_unsafe=True):
            return self._run(tokens, slots, positions)

    @torch.inference_mode()
    def _run(self, tokens: list[int], slots: list[int], positions: list[int]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(tokens), ROWS):
            n = min(ROWS, len(tokens) - start)
            pad = (1 if n == 1 else 2 if n == 2 else ROWS) - n
            rows = torch.tensor([tokens[start:start + n] + [0] * pad, slots[start:start + n] + [self.scratch_slot] * pad,
                                 positions[start:start + n] + [0] * pad])  # (3, bsz)
            chunks.append(self.step(rows[0], rows[1], rows[2], self.rows[n], self.cache.k, self.cache.v)[:n])
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)
