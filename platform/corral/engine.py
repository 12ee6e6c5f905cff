"""Sampling and a continuous-batching generation engine over a KV-cache slot pool.

One engine serves every caller. RLHF rollouts, rejection sampling and evaluation call `generate`
(synchronous: a batch of prompts in, token ids out); the Serve model server calls `stream`
(async: one request, its tokens as they are produced). Both run the same `step`:

1. admit waiting requests into free cache slots and prefill them, up to `max_prefill_tokens` per
   step so that running requests keep decoding while new ones arrive (in one forward where the
   matmuls are row-invariant, see below; else one prompt per forward);
2. decode one token for every running request in one batched forward (each row attends only
   to its own slot, at its own position);
3. sample every row with its own parameters and its own random stream, detokenize, check stop
   tokens and stop strings, and retire finished requests, freeing their slots for the next step.

A request's tokens depend only on its prompt, parameters and seed, not on what else runs
(`batch_invariant`, the default): prefill and decode attend row by row over each row's own
length, and decode pads the batch to at least `min_decode_rows` rows, because CPU BLAS picks a
different matrix-multiply kernel for fewer rows and the last bits of the logits would then depend
on the batch size (a greedy token can flip on a near-tie, which random-weight models are
full of). The price is speed at low concurrency; `batch_invariant=False` drops both measures.

bf16 on a CPU: `pack_linears` reorders every weight once into oneDNN's blocked layout, which the
decode step's small matmuls read faster; those kernels give a row the same bits for any batch of two
rows or more, so the padding is one row, not fifteen, and the prompts admitted in a step are
prefilled in one forward (right-padded; each row attends over its own tokens).

`compile_decode` (CPU): the decode step is one TorchInductor graph per batch size instead
(`corral.compiled_decode`), whose kernels compute each row alone, so no padding row at all; about
2x the eager step at a few rows, slower at many on CPUs without AMX. Prefill stays eager.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import random
import threading
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from corral.model import CacheView, KVCache, Layout, Transformer
from corral.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MAX_LOGPROBS = 20  # vLLM's limit for top log-probabilities per token
MAX_STEP_FAILURES = 3  # failed forwards in a row after which the engine stops: something is broken for good
# measured on x86: MKL's fp32 GEMM gives a row the same bits for any batch of >= 16 rows; oneDNN's
# bf16 one (packed or not), on a CPU with bf16 instructions, for any batch of >= 2 (one row takes a
# GEMV kernel once K >= 2048). Elsewhere (CUDA included) 16, as the H200 check measured.
MIN_DECODE_ROWS_BF16_CPU = 2
MIN_DECODE_ROWS_DEFAULT = 16


@functools.cache
def native_bf16_cpu() -> bool:
    """oneDNN on a CPU with bf16 instructions (AVX-512 bf16 or AMX): where packing pays and where
    the bf16 row invariance above was measured."""
    from corral.train.strategy import FAST_BF16_FLAGS, cpu_flags

    return torch.backends.mkldnn.is_available() and any(f in cpu_flags() for f in FAST_BF16_FLAGS)
LAST = Layout(logits_at="last")  # sampling reads only each row's last logits
ALL = Layout()  # a prefill whose prompt log-probabilities were asked for (echo)


class SamplingParams(BaseModel):
    """How one request samples. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, lt=1 << 31)
    stop: list[str] = Field(default_factory=list, description="stop strings; the text ends before the first match")
    stop_token_ids: list[int] | None = Field(default=None, description="None = the tokenizer's EOS")
    ignore_eos: bool = Field(default=False, description="keep generating past EOS (benchmarks)")
    seed: int | None = Field(default=None, ge=-(1 << 63), lt=1 << 64,
                             description="same seed, prompt and params -> same tokens")
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS,
                                 description="log-probability of each sampled token and of its N most likely")
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS,
                                        description="the same for every prompt token after the first (echo)")


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (raw logits, before temperature or filters), and
    the `top` most likely tokens at its position as (token id, log-probability), most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Output:
    """What one request produced since its previous Output (a streaming delta)."""

    request_id: int
    token_ids: list[int]
    text: str
    prompt_tokens: int
    completion_tokens: int  # so far, EOS included
    finish_reason: str | None = None  # "stop" | "length" | "error" once finished
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first output only: one per prompt token
    error: str | None = None  # why the engine failed this request (finish_reason "error")

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    on_output: Callable[[Output], None]
    generator: torch.Generator
    stop_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)
    slot: int | None = None
    emitted_text: str = ""
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # computed at prefill, sent with the first output


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
           uniform: torch.Tensor) -> torch.Tensor:
    """One token per row of logits (bsz, vocab), each row with its own parameters.

    Rows with temperature 0 take the argmax. The others sample from softmax(logits / T) restricted
    to the top_k most likely tokens (0 = all) and to the smallest set whose mass reaches top_p, by
    inverse CDF with the row's own uniform draw in [0, 1): a row's token depends only on its
    logits, its parameters and its draw, never on the other rows of the batch.
    """
    bsz, vocab = logits.shape
    greedy = logits.argmax(-1)
    if not temperature.any():  # all greedy: no distribution to build (the draws are still consumed)
        return greedy
    probs = torch.softmax(logits / temperature.clamp(min=1e-6)[:, None], dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # (bsz, vocab)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    keep = (sorted_probs.cumsum(-1) - sorted_probs) < top_p[:, None]  # mass before this token < top_p
    keep &= rank < torch.where(top_k > 0, top_k, vocab)[:, None]
    keep[:, 0] = True  # the most likely token always survives
    kept = sorted_probs * keep
    threshold = uniform * kept.sum(-1)  # (bsz,)
    choice = (kept.cumsum(-1) <= threshold[:, None]).sum(-1).clamp(max=vocab - 1)
    sampled = order.gather(1, choice[:, None])[:, 0]
    return torch.where(temperature == 0, greedy, sampled)


class Engine:
    """Continuous batching of generation requests over a fixed pool of KV-cache slots.

    The pool holds `max_batch_size` sequences of up to `max_seq_len` tokens each, allocated once
    (its memory is `cache.nbytes()`); requests beyond it wait in a FIFO queue and are admitted as
    slots free up. `cancel` frees a request's slot at once.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None, max_batch_size: int = 32,
                 max_seq_len: int | None = None, max_prefill_tokens: int = 512, batch_invariant: bool = True,
                 compile_decode: bool = False):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_seq_len = min(max_seq_len or model.config.max_seq_len, model.config.max_seq_len)
        self.max_prefill_tokens = max_prefill_tokens
        self.batch_invariant = batch_invariant
        param = next(model.parameters())
        self.device = param.device
        bf16_cpu = param.device.type == "cpu" and param.dtype == torch.bfloat16 and native_bf16_cpu()
        self.min_decode_rows = 1 if not batch_invariant else \
            MIN_DECODE_ROWS_BF16_CPU if bf16_cpu else MIN_DECODE_ROWS_DEFAULT
        # one slot more than requests: the scratch row that pads small decode batches
        # attention in fp32 on a CPU (see KVCache), in the weights' dtype on an accelerator
        self.cache = KVCache(model.config, max_batch_size + 1, self.max_seq_len, device=param.device,
                             dtype=torch.float32 if param.device.type == "cpu" else param.dtype)
        self.max_batch_size = self._scratch_slot = max_batch_size
        self.compiled_decode = None
        if compile_decode:  # every row alone by construction: no padding rows (corral.compiled_decode)
            from corral.compiled_decode import CompiledDecode

            self.compiled_decode = CompiledDecode(model, self.cache, self._scratch_slot, batch_invariant)
        self._free_slots = deque(range(max_batch_size))
        self._waiting: deque[_Request] = deque()
        self._running: dict[int, _Request] = {}  # request id -> request holding a slot
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards the queues; held only briefly, never across a forward
        self._work = threading.Condition(self._lock)
        self._step_lock = threading.Lock()  # one step at a time: background loop or generate()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._failures = 0  # failed forwards in a row
        self.fatal: str | None = None  # why the engine stopped for good
        self.cancelled_total = 0

    # -- submitting and cancelling -------------------------------------------------------------
    def submit(self, prompt: Sequence[int], params: SamplingParams, on_output: Callable[[Output], None]) -> int:
        """Queue a request; `on_output` is called from the engine's thread with every delta."""
        if self.fatal is not None:
            raise EngineError(f"the engine stopped: {self.fatal}")
        prompt = list(prompt)
        self.check_fits(len(prompt), params.max_tokens)
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: build the Engine with one, or use stop_token_ids")
        stop_ids = params.stop_token_ids
        if stop_ids is None:
            stop_ids = [] if self.tokenizer is None else [self.tokenizer.eos_id]
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        request = _Request(id=next(self._ids), prompt=prompt, params=params, on_output=on_output,
                           generator=torch.Generator().manual_seed(seed),
                           stop_ids=frozenset() if params.ignore_eos else frozenset(stop_ids))
        with self._work:
            self._waiting.append(request)
            self._work.notify()
        return request.id

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise ValueError unless a prompt and its completion fit one cache slot."""
        if prompt_tokens < 1:
            raise ValueError("the prompt is empty: give at least one token")
        if prompt_tokens + max_tokens > self.max_seq_len:
            raise ValueError(
                f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the context "
                f"of {self.max_seq_len} tokens; shorten the prompt or lower max_tokens"
            )

    def cancel(self, request_id: int) -> bool:
        """Drop a request; its cache slot is free for the next step. False if it already finished."""
        with self._lock:
            request = self._running.pop(request_id, None)
            if request is not None:
                self._free_slots.append(request.slot)
            else:
                request = next((r for r in self._waiting if r.id == request_id), None)
                if request is None:
                    return False
                self._waiting.remove(request)
            request.finish_reason = "cancelled"
            self.cancelled_total += 1
            return True

    def stats(self) -> dict[str, int]:
        """Running and queued requests and cache use, for metrics."""
        with self._lock:
            return {
                "running": len(self._running),
                "waiting": len(self._waiting),
                "slots_total": self.max_batch_size,
                "slots_used": self.max_batch_size - len(self._free_slots),
                "cache_tokens_used": sum(len(r.prompt) + len(r.tokens) for r in self._running.values()),
                "cache_tokens_total": self.max_batch_size * self.max_seq_len,
                "cancelled_total": self.cancelled_total,
            }

    # -- the step --------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """Admit and prefill what fits, then decode one token for every running request.

        A forward that raises fails only the requests it concerns: a prefill its own request; a
        batched decode is retried row by row, and only the rows that fail alone are failed. After
        `MAX_STEP_FAILURES` failed forwards in a row the engine stops (`health()` says why).
        """
        with self._step_lock:
            for group in self._prefill_groups(self._admit()):
                if not self._guarded(group, self._prefill, fail=len(group) == 1):
                    for request in group:  # find the prompts that fail on their own
                        self._guarded([request], self._prefill)
            with self._lock:
                batch = list(self._running.values())
            if batch and not self._guarded(batch, self._decode, fail=False):
                for request in batch:  # find the rows that fail on their own
                    if request.finish_reason is None:
                        self._guarded([request], self._decode)

    def _prefill_groups(self, admitted: list[_Request]) -> list[list[_Request]]:
        """Prompts prefilled together in one forward: all of them where the matmuls give a row the
        same bits in any batch of two rows or more (bf16 on a CPU), else one at a time; a prompt
        whose log-probabilities were asked for (echo) always alone."""
        if self.min_decode_rows > 2:
            return [[r] for r in admitted]
        together = [r for r in admitted if r.params.prompt_logprobs is None]
        return [[r] for r in admitted if r.params.prompt_logprobs is not None] + ([together] if together else [])

    def _prefill(self, batch: list[_Request]) -> None:
        """Prefill prompts into their slots in one forward, right-padded to the longest: each row
        attends over exactly its own tokens, so a prompt's logits are those it gets alone."""
        lengths = [len(r.prompt) for r in batch]
        pad = 1 if len(batch) == 1 and lengths[0] == 1 and self.min_decode_rows > 1 else 0  # >= 2 rows
        longest = max(lengths)
        tokens = torch.tensor([r.prompt + [0] * (longest - len(r.prompt)) for r in batch] + [[0] * longest] * pad,
                              device=self.device)  # (bsz, longest)
        slots = torch.tensor([r.slot for r in batch] + [self._scratch_slot] * pad, device=self.device)
        view = CacheView(self.cache, slots, torch.zeros_like(slots), exact_rows=len(batch), lengths=lengths)
        if batch[0].params.prompt_logprobs is not None:  # alone: every position's logits
            request, want = batch[0], batch[0].params.prompt_logprobs
            logits = self.model(tokens, ALL, view)[0]  # (prompt_len, vocab)
            # token t's log-probability comes from the logits at t - 1
            request.prompt_logprobs = [None] + token_logprobs(logits[:-1], tokens[0, 1:], want)
            self._sample_and_advance(batch, logits[-1:])
            return
        last = torch.zeros(tokens.shape, dtype=torch.bool, device=self.device)
        last[torch.arange(len(batch)), torch.tensor(lengths) - 1] = True
        self._sample_and_advance(batch, self.model(tokens, Layout(logits_at=last), view))  # (len(batch), vocab)

    def _decode(self, batch: list[_Request]) -> None:
        tokens, slots = [r.tokens[-1] for r in batch], [r.slot for r in batch]
        positions = [len(r.prompt) + len(r.tokens) - 1 for r in batch]
        if self.compiled_decode is not None:  # rows alone by construction: no padding
            self._sample_and_advance(batch, self.compiled_decode(tokens, slots, positions))
            return
        pad = max(0, self.min_decode_rows - len(batch))
        as_tensor = lambda values, fill: torch.tensor(values + [fill] * pad, device=self.device)  # noqa: E731
        view = CacheView(self.cache, as_tensor(slots, self._scratch_slot), as_tensor(positions, 0),
                         exact_rows=len(batch) if self.batch_invariant else None)
        logits = self.model(as_tensor(tokens, 0)[:, None], LAST, view)  # tokens (bsz, 1)
        self._sample_and_advance(batch, logits[: len(batch), -1])

    def _guarded(self, batch: list[_Request], forward: Callable[[list[_Request]], None], fail: bool = True) -> bool:
        """Run one forward over `batch`; on an exception fail its requests (when `fail`) and count it."""
        try:
            forward(batch)
        except Exception as e:  # an out-of-memory, a bad weight, a bug: this forward's requests only
            self._failures += 1
            error = f"the engine failed this request: {type(e).__name__}: {e}"
            log.exception("engine forward failed (%d in a row)", self._failures)
            if self._failures >= MAX_STEP_FAILURES:
                self._stop(f"{self._failures} forwards in a row failed; the last: {type(e).__name__}: {e}")
            elif fail:
                self._fail(batch, error)
            return False
        self._failures = 0
        return True

    def _fail(self, requests: list[_Request], error: str) -> None:
        """End requests with finish_reason "error", freeing their slots."""
        for request in requests:
            if request.finish_reason is None:
                self._release(request, "error")
                request.on_output(Output(request.id, [], "", len(request.prompt), len(request.tokens), "error",
                                         error=error))

    def _stop(self, reason: str) -> None:
        """The engine cannot go on: fail every request, refuse new ones, report it in `health()`."""
        self.fatal = reason
        with self._lock:
            requests = [*self._running.values(), *self._waiting]
            self._waiting.clear()
        self._fail(requests, f"the engine stopped: {reason}")

    def health(self) -> str | None:
        """Why this engine cannot serve (it stopped, or its background loop died), or None."""
        if self.fatal is None and self._thread is not None and not self._thread.is_alive() and not self._closed:
            return "the engine's background loop is not running"
        return self.fatal

    def _admit(self) -> list[_Request]:
        """Move waiting requests into free slots, FIFO, within the step's prefill budget."""
        admitted, budget = [], self.max_prefill_tokens
        with self._lock:
            while self._waiting and self._free_slots:
                if admitted and len(self._waiting[0].prompt) > budget:
                    break
                request = self._waiting.popleft()
                request.slot = self._free_slots.popleft()
                self._running[request.id] = request
                budget -= len(request.prompt)
                admitted.append(request)
        return admitted

    def _sample_and_advance(self, batch: list[_Request], logits: torch.Tensor) -> None:
        """Sample one token per request from its logits row (bsz, vocab) and deliver the deltas."""
        params = [r.params for r in batch]
        as_tensor = lambda values, dtype: torch.tensor(values, dtype=dtype, device=logits.device)  # noqa: E731
        uniform = torch.cat([torch.rand(1, generator=r.generator) for r in batch]).to(logits.device)
        next_tokens = sample(
            logits, as_tensor([p.temperature for p in params], torch.float32),
            as_tensor([p.top_p for p in params], torch.float32), as_tensor([p.top_k for p in params], torch.long),
            uniform,
        )
        logprobs: list[TokenLogprob | None] = [None] * len(batch)
        asked = [i for i, p in enumerate(params) if p.logprobs is not None]
        if asked:  # top-N differs per row: one call per distinct N
            for n in {params[i].logprobs for i in asked}:
                rows = [i for i in asked if params[i].logprobs == n]
                for i, lp in zip(rows, token_logprobs(logits[rows], next_tokens[rows], n)):
                    logprobs[i] = lp
        for request, token, lp in zip(batch, next_tokens.tolist(), logprobs):  # host-device sync: one per step
            if request.finish_reason is None:  # not cancelled while the forward ran
                self._advance(request, token, lp)

    def _advance(self, request: _Request, token: int, logprob: TokenLogprob | None = None) -> None:
        request.tokens.append(token)
        text, finish = self._text_so_far(request)
        if finish is None and (len(request.tokens) >= request.params.max_tokens
                               or len(request.prompt) + len(request.tokens) >= self.max_seq_len):
            finish = "length"
        if finish is not None:
            self._release(request, finish)
        else:
            text = _hold_back(text, request.params.stop)
        delta = text[len(request.emitted_text):] if text.startswith(request.emitted_text) else ""
        request.emitted_text += delta
        prompt_logprobs, request.prompt_logprobs = request.prompt_logprobs, None  # sent once, with the first
        request.on_output(Output(request.id, [token], delta, len(request.prompt), len(request.tokens), finish,
                                 logprobs=None if logprob is None else [logprob], prompt_logprobs=prompt_logprobs))

    def _text_so_far(self, request: _Request) -> tuple[str, str | None]:
        """The completion's text and "stop" when a stop token or stop string ended it."""
        stopped = request.tokens[-1] in request.stop_ids
        if self.tokenizer is None:
            return "", "stop" if stopped else None
        text = decode_continuation(self.tokenizer, request.prompt, request.tokens[:-1] if stopped else request.tokens)
        if stopped:
            return text, "stop"
        for stop in request.params.stop:
            # only text not yet emitted can hold a new match
            at = text.find(stop, max(0, len(request.emitted_text) - len(stop) + 1))
            if at >= 0:
                return text[:at], "stop"
        return text, None

    def _release(self, request: _Request, finish_reason: str) -> None:
        with self._lock:
            request.finish_reason = finish_reason
            if self._running.pop(request.id, None) is not None:
                self._free_slots.append(request.slot)

    # -- synchronous batch API (RLHF rollouts, evaluation) -----------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        """Completion token ids for every prompt (stop token included when it ended the sequence).

        With `params.seed` set, prompt i samples with seed + i: K copies of one prompt give K
        different samples, and the whole batch is reproducible.
        """
        tokens: dict[int, list[int]] = defaultdict(list)
        finished: set[int] = set()
        done = threading.Event()

        def collect(out: Output) -> None:
            tokens[out.request_id] += out.token_ids
            if out.finished:
                finished.add(out.request_id)
                if len(finished) == len(prompts):
                    done.set()

        def seeded(i: int) -> SamplingParams:
            return params if params.seed is None else params.model_copy(update={"seed": params.seed + i})

        errors: list[str] = []

        def collect_or_fail(out: Output) -> None:
            if out.error is not None:
                errors.append(out.error)
            collect(out)

        ids = [self.submit(prompt, seeded(i), collect_or_fail) for i, prompt in enumerate(prompts)]
        while ids and not done.is_set():
            if self._thread is None:
                self.step()
            else:
                done.wait(timeout=0.1)
        if errors:
            raise EngineError(f"{len(errors)} of {len(prompts)} requests failed; the first: {errors[0]}")
        return [tokens[i] for i in ids]

    # -- asynchronous streaming API (serving) ------------------------------------------------------
    async def stream(self, prompt: Sequence[int], params: SamplingParams) -> AsyncIterator[Output]:
        """Yield one request's deltas as the background loop produces them; raise EngineError if
        the engine failed the request.

        Deltas that pile up while the consumer is busy are merged into one. Leaving the loop early
        (a client that disconnects cancels the task) frees the request's cache slot at once.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Output] = asyncio.Queue()
        request_id = self.submit(prompt, params, lambda out: loop.call_soon_threadsafe(queue.put_nowait, out))
        self.start()
        try:
            async for out in deltas(queue):
                yield out
        finally:
            self.cancel(request_id)  # no-op when it finished

    def start(self) -> None:
        """Run steps on a background thread whenever there is work (idempotent)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="corral-engine", daemon=True)
                self._thread.start()

    def close(self) -> None:
        with self._work:
            self._closed = True
            self._work.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while self.fatal is None:
            with self._work:
                while not (self._waiting or self._running or self._closed):
                    self._work.wait()
                if self._closed:
                    return
            try:
                self.step()
            except Exception as e:  # outside any one forward: the engine's own state is suspect
                log.exception("engine step failed")
                self._stop(f"a step failed outside the model: {type(e).__name__}: {e}")


class PackedLinear(nn.Module):
    """An inference-only `nn.Linear` whose bf16 weight is reordered once into oneDNN's blocked
    layout (what `torch.compile`'s CPU freezing does), instead of on every call."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [None], "")


def pack_linears(model: Transformer) -> Transformer:
    """Replace `model`'s linear layers by `PackedLinear`s where that pays (bf16 weights on a CPU
    with bf16 instructions); the model is then for inference only. Measured on the small preset: a decode
    step's matmuls 1.7x faster at one row, 1.9x at 32 (`benchmarks/serve_load.py`)."""
    param = next(model.parameters())
    if param.dtype != torch.bfloat16 or param.device.type != "cpu" or not native_bf16_cpu():
        return model
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear) and child.bias is None:
                setattr(module, name, PackedLinear(child))
    return model


class EngineError(RuntimeError):
    """The engine failed a request (its forward raised) or has stopped."""


async def deltas(queue: asyncio.Queue[Output]) -> AsyncIterator[Output]:
    """One request's Outputs from `queue` until it finishes, the ones that piled up merged into
    one; EngineError if the engine failed the request."""
    while True:
        out = await queue.get()
        while not out.finished and not queue.empty():
            out = _merge(out, queue.get_nowait())
        if out.error is not None:
            raise EngineError(out.error)
        yield out
        if out.finished:
            return


def _merge(a: Output, b: Output) -> Output:
    """Two consecutive deltas of one request as one."""
    logprobs = None if a.logprobs is None and b.logprobs is None else (a.logprobs or []) + (b.logprobs or [])
    return Output(a.request_id, a.token_ids + b.token_ids, a.text + b.text, b.prompt_tokens, b.completion_tokens,
                  b.finish_reason, logprobs, a.prompt_logprobs or b.prompt_logprobs, b.error)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_n: int) -> list[TokenLogprob]:
    """The log-probability of `tokens` (n,) under `logits` (n, vocab), raw (no temperature), with
    each position's `top_n` most likely tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (n, vocab)
    chosen = logp.gather(1, tokens[:, None].long())[:, 0].tolist()
    top_lp, top_ids = logp.topk(top_n, dim=-1) if top_n else (logp[:, :0], logp[:, :0].long())
    return [TokenLogprob(int(t), c, list(zip(ids, lps)))
            for t, c, ids, lps in zip(tokens.tolist(), chosen, top_ids.tolist(), top_lp.tolist())]


def decode_continuation(tokenizer: Tokenizer, prompt: Sequence[int], tokens: Sequence[int]) -> str:
    """The text of `tokens` generated after `prompt`. Decoding them after the prompt's last token
    keeps a leading space (or an indent) that SentencePiece drops from a text's first piece."""
    anchor = list(prompt[-1:])
    anchor_text = tokenizer.decode(anchor)
    text = tokenizer.decode(anchor + list(tokens))
    return text[len(anchor_text):] if text.startswith(anchor_text) else tokenizer.decode(tokens)


def _hold_back(text: str, stops: list[str]) -> str:
    """Text safe to stream: without a trailing partial UTF-8 character or a possible stop-string start."""
    text = text.rstrip("\ufffd")  # byte-fallback pieces of a character not yet complete
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                text = text[:-n]
                break
    return text
