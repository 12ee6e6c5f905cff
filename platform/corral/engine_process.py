"""The corral engine in a process of its own, as vLLM runs its engine core.

A model server's process also runs Ray Serve's threads: they receive requests and ship every
streamed delta, in Python, under the interpreter's one lock. An engine thread beside them releases
that lock at every tensor operation of a step (hundreds of them) and waits to get it back. Measured
on the 2-core host with the small preset at concurrency 32: a step's wall time was 1.7x its CPU
time. In its own process the engine steps undisturbed; the server's process only routes messages.

The child loads the model, runs `Engine.step` in a loop and, after each step, sends every delta the
step produced (with the engine's stats and health) in one message over a pipe. A thread of the
parent reads them and hands each to its request's asyncio queue, one wake-up per event loop per
step. A child that dies fails its requests and turns `health()` red; a parent that dies closes
the pipe, and the child exits.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

import torch

from corral.engine import Engine, EngineError, Output, SamplingParams, deltas, pack_linears


class EngineProcess:
    """`Engine`'s serving interface (`stream`, `stats`, `health`, `max_seq_len`) over an engine
    in a child process, which loads the checkpoint at `model` itself."""

    def __init__(self, model: str, dtype: str = "float32", device: str = "cpu", max_batch_size: int = 32,
                 batch_invariant: bool = True, num_threads: int | None = None, compile_decode: bool = False,
                 start_timeout_s: float = 900):
        context = multiprocessing.get_context("spawn")  # no fork of a process that runs threads
        self._conn, child_end = context.Pipe()
        self._process = context.Process(
            target=_run_child, name="corral-engine", daemon=True,
            args=(child_end, model, dtype, device, max_batch_size, batch_invariant, num_threads, compile_decode))
        self._process.start()
        child_end.close()
        if not self._conn.poll(start_timeout_s):
            self._process.kill()
            raise EngineError(f"the engine process did not load {model} within {start_timeout_s:.0f}s")
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            raise EngineError(f"the engine process exited while loading {model} "
                              f"(exit code {self._process.exitcode}; its log has why)") from None
        if kind == "failed":
            raise EngineError(f"the engine process could not load {model}: {payload}")
        self.max_seq_len, self.max_batch_size, self._stats = payload
        self.fatal: str | None = None
        self._queues: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._send_lock = threading.Lock()
        threading.Thread(target=self._read, name="corral-engine-reader", daemon=True).start()

    async def stream(self, prompt: Sequence[int], params: SamplingParams) -> AsyncIterator[Output]:
        """As `Engine.stream`: one request's deltas; EngineError if the engine failed it."""
        request_id, queue = next(self._ids), asyncio.Queue()
        self._queues[request_id] = (asyncio.get_running_loop(), queue)
        finished = False
        try:
            if self.fatal is not None:  # checked once registered: a reader that finds the child gone after
                raise EngineError(f"the engine stopped: {self.fatal}")  # this fails the request it sees
            self._send("submit", request_id, list(prompt), params)
            async for out in deltas(queue):
                finished = out.finished
                yield out
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._send("cancel", request_id)

    def stats(self) -> dict[str, int]:
        """The engine's stats as of its last step."""
        return dict(self._stats)

    def health(self) -> str | None:
        return self.fatal

    def close(self) -> None:
        self._process.kill()

    def _send(self, *message) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except OSError:  # the child is gone; the reader reports it
            pass

    def _read(self) -> None:
        """Hand each delta the child sends to its request's queue, until the child is gone."""
        try:
            while True:
                outputs, self._stats, fatal = self._conn.recv()
                self.fatal = self.fatal or fatal
                self._deliver(outputs)
        except (EOFError, OSError):
            pass
        self._process.join(timeout=5)
        self.fatal = f"the engine process exited (exit code {self._process.exitcode}); its log has why"
        self._deliver([Output(rid, [], "", 0, 0, "error", error=self.fatal) for rid in list(self._queues)])

    def _deliver(self, outputs: list[Output]) -> None:
        by_loop = defaultdict(list)
        for out in outputs:
            if (entry := self._queues.get(out.request_id)) is not None:
                by_loop[entry[0]].append((entry[1], out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue, Output]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)


def load_engine(model: str, dtype: str = "float32", device: str = "cpu", max_batch_size: int = 32,
                batch_invariant: bool = True, num_threads: int | None = None, compile_decode: bool = False) -> Engine:
    """An Engine over the checkpoint at `model` as serving runs it: `num_threads` torch threads,
    weights in `dtype` on `device`, packed where that pays (`pack_linears`), or, with
    `compile_decode`, left as they are for TorchInductor (`corral.compiled_decode`)."""
    import corral

    if num_threads:
        torch.set_num_threads(num_threads)
    weights = corral.load_model(model, getattr(torch, dtype)).to(device)
    if not compile_decode:
        weights = pack_linears(weights)
    return Engine(weights, corral.load_tokenizer(model), max_batch_size, batch_invariant=batch_invariant,
                  compile_decode=compile_decode)


def _run_child(conn, model: str, dtype: str, device: str, max_batch_size: int, batch_invariant: bool,
               num_threads: int | None, compile_decode: bool) -> None:
    """The child: load the model, then step whenever there is work, reading requests between steps."""
    try:
        engine = load_engine(model, dtype, device, max_batch_size, batch_invariant, num_threads, compile_decode)
    except Exception as e:  # a bad checkpoint, no memory: the parent raises it
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", (engine.max_seq_len, max_batch_size, engine.stats())))
    ids: dict[int, int] = {}  # parent's request id -> engine's
    outbox: list[Output] = []

    def collect(parent_id: int):
        def on_output(out: Output) -> None:
            outbox.append(replace(out, request_id=parent_id))
            if out.finished:
                ids.pop(parent_id, None)
        return on_output

    try:
        while True:
            busy = bool(ids)
            while conn.poll(0 if busy else None):  # idle: block until a message comes
                kind, request_id, *args = conn.recv()
                if kind == "submit":
                    prompt, params = args
                    try:
                        ids[request_id] = engine.submit(prompt, params, collect(request_id))
                    except (ValueError, EngineError) as e:
                        outbox.append(Output(request_id, [], "", len(prompt), 0, "error", error=str(e)))
                elif request_id in ids:  # cancel
                    engine.cancel(ids.pop(request_id))
                busy = True
            engine.step()
            conn.send((outbox, engine.stats(), engine.fatal))
            outbox = []
    except (EOFError, OSError):  # the parent is gone
        return
