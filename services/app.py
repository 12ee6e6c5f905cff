"""The OpenAI-compatible Serve application: one model-server deployment bound as `base` and `chat`.

    client --HTTP--> Serve proxy --> OpenAIServer (FastAPI ingress) --handle, streaming--> base | chat

`ModelServer` wraps a continuous-batching engine, per model either corral's own (`corral.engine.Engine`,
the CPU default, stepping in a process of its own) or vLLM's (`corral.vllm_engine.VllmEngine`: paged KV,
prefix caching, tensor parallelism, for the GPU pools); every request streams its deltas back over
a DeploymentHandle, and the ingress turns them into one JSON response or into Server-Sent Events.
Both engines sit behind the same ingress, API keys, error bodies, limits, metrics and health.
Replica counts, autoscaling, `max_ongoing_requests`, `max_queued_requests` and `accelerator_type`
come from the Serve config file (services/configs/), never from this code.

`build_app` is the config's `import_path` (services.app:build_app); its `args` are `AppArgs`.
"""

import asyncio
import hmac
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Gauge, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException

import corral
from corral.engine import EngineError, SamplingParams, TokenLogprob
from corral.engine_process import EngineProcess, load_engine
from corral.guard import Guard
from corral.registry import model_cache, pin_version, resolve_model
from corral.tokenizer import ChatFormatError
from corral.vllm_engine import VllmArgs, VllmEngine, hf_export
from services.api import (
    APIError, ChatCompletionRequest, CompletionRequest, ModerationRequest, Usage, chat_body, chat_chunk,
    completion_body, completion_choice, moderation_body, new_id, parse_request, sse,
)

RETRY_AFTER_S = 1  # what an overloaded deployment asks clients to wait
HEALTH_TIMEOUT_S = 5  # a model replica that does not answer /health within this is reported unhealthy
log = logging.getLogger("ray.serve")


# -- configuration ------------------------------------------------------------------------------------
class ModelArgs(BaseModel):
    """One served model: where its checkpoint is and how the engine runs it."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="checkpoint path or models:/NAME@ALIAS; None = env var")
    served_name: str = Field(min_length=1, description="the `model` clients ask for")
    engine: Literal["corral", "vllm"] = Field(default="corral", description="corral's engine (CPU default) or "
                                              "vLLM's (GPU pools; paged KV, tensor parallelism)")
    max_batch_size: int = Field(default=32, ge=1, description="requests decoded together (KV-cache slots; "
                                "vLLM's max_num_seqs)")
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = Field(default="auto", description="corral engine: torch device; auto = cuda when the replica "
                        "has a GPU")
    batch_invariant: bool = Field(default=True, description="corral engine: greedy tokens under load = alone "
                                  "(slower at batch 1)")
    num_threads: int | None = Field(default=None, ge=1, description="corral engine: torch CPU threads; None = "
                                    "Ray's default (the replica's num_cpus)")
    engine_process: bool = Field(default=True, description="corral engine: step in a process of its own, as vLLM "
                                 "does, not in a thread beside Serve's (corral.engine_process)")
    compile_decode: bool = Field(default=False, description="corral engine on a CPU: decode steps compiled by "
                                 "TorchInductor (about 2x faster at a few requests, slower at many on CPUs "
                                 "without AMX; the replica compiles for a minute or two at start; "
                                 "corral.compiled_decode)")
    vllm: VllmArgs | None = Field(default=None, description="vLLM engine's own knobs (engine: vllm only)")

    @model_validator(mode="after")
    def _vllm_args_need_vllm(self) -> "ModelArgs":
        if self.vllm is not None and self.engine != "vllm":
            raise ValueError(f"{self.served_name}: `vllm` settings are given but engine is {self.engine!r}; "
                             f"set engine: vllm or remove them")
        if self.compile_decode and self.engine != "corral":
            raise ValueError(f"{self.served_name}: compile_decode is the corral engine's; vLLM compiles its own "
                             f"(vllm.enforce_eager: false)")
        return self


Policy = Literal["block", "flag", "off"]


class GuardArgs(BaseModel):
    """A safety classifier (`corral.guard`, trained by the pipeline's guard step) in front of the
    chat model, and what to do with what it flags, per direction: `block` answers with `refusal`
    (finish_reason `content_filter`), `flag` serves the reply and reports the verdict in the
    response's `guard` field, `off` does not ask. It also answers `/v1/moderations`."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="guard checkpoint or models:/NAME@ALIAS; None = env var")
    served_name: str = Field(default="corral-guard", min_length=1, description="the model /v1/moderations names")
    input: Policy = Field(default="block", description="prompts, judged before generation")
    output: Policy = Field(default="block", description="replies, judged as they stream")
    refusal: str = Field(default="I'm sorry, but I can't help with that.", min_length=1,
                         description="the reply in place of a blocked one")
    screen_every: int = Field(default=16, ge=1, description="output: the reply is judged every this many streamed "
                              "deltas (about a token each) and at its end; deltas reach the client only once judged")
    threshold: float = Field(default=0.5, gt=0, lt=1, description="flagged when P(unsafe) is at least this")
    dtype: Literal["float32", "bfloat16"] = "float32"
    log_content: bool = Field(default=False, description="log the text of blocked requests (default: categories only)")


class AppArgs(BaseModel):
    """The `args` of the Serve config's application."""

    model_config = ConfigDict(extra="forbid")

    base: ModelArgs | None = None
    chat: ModelArgs | None = None
    guard: GuardArgs | None = Field(default=None, description="screens the chat model's prompts and replies")
    api_keys: list[str] = Field(default_factory=list, description="Bearer keys; empty = CORRAL_API_KEYS or none")
    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="larger request bodies get a 413")
    request_timeout_s: float = Field(default=600, gt=0, description="a request still generating after this "
                                     "gets a 408 (a stream ends with an error event)")


MODEL_ENV = {"base": "CORRAL_BASE_MODEL", "chat": "CORRAL_CHAT_MODEL", "guard": "CORRAL_GUARD_MODEL"}


def build_app(args: dict) -> serve.Application:
    """The Serve application from the config's `args`; a model's path may come from its env var."""
    config = AppArgs.model_validate(args)
    handles = {}
    for role in ("base", "chat", "guard"):
        model_args = getattr(config, role)
        if model_args is None:
            continue
        source = model_args.model or os.environ.get(MODEL_ENV[role])
        if not source:
            raise ValueError(f"no checkpoint for the {role} model: set args.{role}.model in the Serve config "
                             f"or the {MODEL_ENV[role]} environment variable (a path or models:/NAME@ALIAS)")
        pinned = pin_version(source)  # every replica of this deployment serves this one version
        if pinned != source:
            log.info("corral: %s model %s is %s", role, source, pinned)
        if role == "guard":
            bound = GuardServer.options(name=role).bind(pinned, model_args.threshold, model_args.dtype)
            handles[role] = (bound, model_args.served_name, pinned, model_args.model_dump())
            continue
        bound_args = model_args.model_dump() | {"model": pinned, "chat": role == "chat"}
        handles[role] = (ModelServer.options(name=role).bind(**bound_args), model_args.served_name, pinned)
    if "base" not in handles and "chat" not in handles:
        raise ValueError("the Serve config's args name no model: give args.base and/or args.chat")
    if "guard" in handles and "chat" not in handles:
        raise ValueError("args.guard screens the chat model, but args.chat is not given")
    return OpenAIServer.bind(handles.get("base"), handles.get("chat"), config.api_keys, config.max_body_bytes,
                             config.request_timeout_s, handles.get("guard"))


# -- the model server ------------------------------------------------------------------------------------
@serve.deployment(ray_actor_options={"num_cpus": 1})
class ModelServer:
    """One model behind a continuous-batching engine; `generate` streams a request's deltas."""

    def __init__(self, model: str, served_name: str, chat: bool = False, engine: str = "corral",
                 max_batch_size: int = 32, dtype: str = "float32", device: str = "auto", batch_invariant: bool = True,
                 num_threads: int | None = None, engine_process: bool = True, compile_decode: bool = False,
                 vllm: dict | None = None):
        path = resolve_model(model)
        self.name, self.chat, self.source = served_name, chat, model
        self.tokenizer = corral.load_tokenizer(path)  # prompts and chat templates: corral's, for both engines
        if engine == "vllm":
            self.engine = VllmEngine(hf_export(path, model_cache()), max_batch_size, dtype,
                                     VllmArgs.model_validate(vllm or {}))
        else:
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            engine_args = (str(path), dtype, device, max_batch_size, batch_invariant, num_threads, compile_decode)
            if engine_process:
                self.engine = EngineProcess(*engine_args)
            else:
                self.engine = load_engine(*engine_args)
                self.engine.start()
        self.metrics = _Metrics(served_name)

    def stats(self) -> dict[str, int]:
        """The engine's running/queued requests and cache slots, as the metrics report them."""
        return self.engine.stats()

    def health(self) -> str | None:
        """Why this replica cannot serve, or None (the ingress's /health asks)."""
        return self.engine.health()

    def check_health(self) -> None:
        """Serve's periodic check: an engine that stopped fails it, and Serve replaces the replica."""
        if (reason := self.engine.health()) is not None:
            raise RuntimeError(f"model {self.name}: {reason}")

    async def generate(self, request: dict) -> AsyncIterator[dict]:
        """Yield {"error", "status"} for a bad request or a failed one, else deltas {"text",
        "finish_reason", usage counts, and "logprobs" / "echo" when asked}."""
        try:  # tokenising a long prompt takes a while: not on the event loop every stream shares
            prompt, params = await asyncio.to_thread(self._prepare, request)
        except APIError as e:
            yield {"status": e.status, **e.body()}
            return
        start = last = time.perf_counter()
        finished = False
        self.metrics.report(self.engine.stats())
        try:
            async for out in self.engine.stream(prompt, params):
                now = time.perf_counter()
                self.metrics.observe_tokens(len(out.token_ids), first=(now - start) if last == start else None,
                                            per_token=(now - last) / len(out.token_ids))
                item = {"text": out.text, "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens,
                        "completion_tokens": out.completion_tokens}
                if out.logprobs is not None:
                    item["logprobs"] = [self._token(lp) for lp in out.logprobs]
                if out.prompt_logprobs is not None:  # echo: the prompt's text and tokens come first
                    text = request["prompt"] if isinstance(request.get("prompt"), str) else \
                        self.tokenizer.decode(prompt)
                    first = {"token": self._piece(prompt[0]), "logprob": None, "top": None}
                    item["echo"] = {"text": text, "tokens": [first] + [self._token(lp) for lp in
                                                                      out.prompt_logprobs[1:]]}
                last, finished = now, out.finished
                yield item
        except EngineError as e:
            error = APIError(500, f"{e}; retry the request", type="server_error", code="engine_error")
            yield {"status": error.status, **error.body()}
        finally:
            if not finished:
                self.metrics.cancelled.inc()
            self.metrics.report(self.engine.stats())

    def _piece(self, token_id: int) -> str:
        """A token as text: SentencePiece's word-start mark is the space it stands for."""
        return self.tokenizer.id_to_piece(token_id).replace("\u2581", " ")

    def _token(self, lp: TokenLogprob) -> dict:
        return {"token": self._piece(lp.token_id), "logprob": lp.logprob,
                "top": [{"token": self._piece(t), "logprob": v} for t, v in lp.top]}

    def _prepare(self, request: dict):
        """Token ids and SamplingParams, or an APIError naming what is wrong."""
        if self.chat:
            try:
                prompt = self.tokenizer.encode_chat(request["messages"])
            except ChatFormatError as e:
                raise APIError(400, str(e), param="messages", code="invalid_messages") from None
            param = "messages"
        elif isinstance(request["prompt"], str):
            prompt, param = self.tokenizer.encode(request["prompt"]), "prompt"
        else:
            prompt, param = request["prompt"], "prompt"
            if not prompt or any(not 0 <= t < self.tokenizer.vocab_size for t in prompt):
                raise APIError(400, f"prompt token ids must be a non-empty list of ids in [0, "
                                    f"{self.tokenizer.vocab_size})", param="prompt", code="invalid_value")
        context = self.engine.max_seq_len
        max_tokens = request["max_tokens"] or max(1, context - len(prompt))  # default: the rest of the context
        if len(prompt) + max_tokens > context:
            raise APIError(400, f"this model's context is {context} tokens, but the prompt has {len(prompt)} tokens "
                                f"and max_tokens asks for {max_tokens}; shorten the {param} or lower max_tokens",
                           param="max_tokens" if len(prompt) < context else param, code="context_length_exceeded")
        return prompt, SamplingParams(max_tokens=max_tokens, **request["sampling"])


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class GuardServer:
    """The safety classifier; concurrent requests' conversations are judged in one batch."""

    def __init__(self, model: str, threshold: float = 0.5, dtype: str = "float32"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.guard = Guard(resolve_model(model), getattr(torch, dtype), device, threshold)

    def categories(self) -> dict[str, str]:
        return self.guard.categories

    def health(self) -> str | None:
        return None

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def assess(self, conversations: list[list[dict]]) -> list[dict]:
        """A verdict (`corral.guard.Verdict` as a dict) on the last message of each conversation."""
        verdicts = await asyncio.to_thread(self.guard.assess, conversations)  # off the replica's event loop
        return [v.to_dict() for v in verdicts]


class _Metrics:
    """Serve metrics of one model server: latency, tokens, requests and cache use."""

    def __init__(self, model: str):
        latency = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]

        def made(metric):
            metric.set_default_tags({"model": model})  # a fresh dict: Serve adds its own tags to it
            return metric

        self.ttft = made(Histogram("corral_time_to_first_token_s", "seconds from request to first token",
                                   latency, tag_keys=("model",)))
        self.itl = made(Histogram("corral_inter_token_latency_s", "seconds between tokens of a request",
                                  latency, tag_keys=("model",)))
        self.tokens = made(Counter("corral_generated_tokens", "tokens generated", tag_keys=("model",)))
        self.cancelled = made(Counter("corral_cancelled_requests", "requests cancelled by the client",
                                      tag_keys=("model",)))
        self.running = made(Gauge("corral_running_requests", "requests decoding", tag_keys=("model",)))
        self.waiting = made(Gauge("corral_queued_requests", "requests waiting for a cache slot",
                                  tag_keys=("model",)))
        self.cache = made(Gauge("corral_cache_slots_used_ratio", "share of KV-cache slots in use",
                                tag_keys=("model",)))

    def observe_tokens(self, n: int, first: float | None, per_token: float) -> None:
        self.tokens.inc(n)
        if first is not None:
            self.ttft.observe(first)
        else:
            self.itl.observe(per_token)

    def report(self, stats: dict[str, int]) -> None:
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        self.cache.set(stats["slots_used"] / stats["slots_total"])


# -- the HTTP ingress ---------------------------------------------------------------------------------------
api = FastAPI(title="corral", description="OpenAI-compatible completions and chat completions")


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@api.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug, not the client's fault: still OpenAI's body, and nothing about the internals."""
    return await _api_error(request, APIError(500, f"internal error ({type(exc).__name__}); the server logs "
                                                   f"have the details", type="server_error", code="internal_error"))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "unknown_url", 405: "method_not_allowed"}.get(exc.status_code)
    return await _api_error(request, APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                              code=code))


# Helpers of the ingress come before its class: `serve.ingress` serializes the class when it is
# decorated, and names defined below it would be missing in the replica.
def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than the limit of {limit} bytes; send a shorter prompt",
                    code="request_too_large")


def _timed_out(limit: float) -> APIError:
    return APIError(408, f"the request was still generating after {limit:g} s (the server's request_timeout_s); "
                         f"ask for fewer max_tokens", code="request_timeout")


def _usage(item: dict) -> Usage:
    return Usage.of(item["prompt_tokens"], item["completion_tokens"])


def _failed(item: dict) -> APIError | None:
    """The error a model replica sent instead of a delta, or None."""
    return APIError(item["status"], **item["error"]) if "error" in item else None


class _Result:
    """A whole non-streaming generation: its text, log-probabilities, echo and last delta."""

    def __init__(self, first: dict):
        self.parts, self.tokens, self.last = [first["text"]], first.get("logprobs"), first
        self.echo = first.get("echo")

    def add(self, item: dict) -> None:
        if (error := _failed(item)) is not None:
            raise error
        self.parts.append(item["text"])
        if self.tokens is not None:
            self.tokens += item.get("logprobs", [])
        self.last = item

    @property
    def text(self) -> str:
        return "".join(self.parts)


async def _collect(first: dict, stream) -> _Result:
    result = _Result(first)
    try:
        async for item in stream:
            result.add(item)
    finally:
        stream.cancel()
    return result


def _completion_choice(index: int, item: dict, echo: dict | None = None) -> dict:
    """A completions choice of one delta (or of a whole result's text and tokens), echo first."""
    text, tokens = item["text"], item.get("logprobs")
    if echo is not None:
        text, tokens = echo["text"] + text, echo["tokens"] + (tokens or [])
    return completion_choice(index, text, item["finish_reason"], tokens)


def _sse_response(first: dict, stream, chunk, timeout_s: float, usage_chunk=None,
                  opening: dict | None = None) -> StreamingResponse:
    """Server-Sent Events in OpenAI's chunk format, ending with `data: [DONE]`; a failure or a
    timeout mid-stream sends OpenAI's error body as the last event before it.

    If the client disconnects, Serve cancels this generator; cancelling the handle's stream then
    cancels the replica's generation, which frees its cache slot.
    """
    async def events():
        last = first
        try:
            if opening is not None:
                yield sse(opening)
            yield sse(chunk(first))
            async with asyncio.timeout(timeout_s):
                async for item in stream:
                    if (error := _failed(item)) is not None:
                        yield sse(error.body())
                        break
                    last = item
                    yield sse(chunk(item))
                else:
                    if usage_chunk is not None:
                        yield sse(usage_chunk(_usage(last)))
        except TimeoutError:
            yield sse(_timed_out(timeout_s).body())
        finally:
            stream.cancel()
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")


class _Ended:
    """A model stream with nothing more to say (a blocked prompt's answer is all in its first item)."""

    def __aiter__(self):
        return self

    async def __anext__(self):
        raise StopAsyncIteration

    def cancel(self) -> None:
        pass


class _Screened:
    """A model's delta stream, released only after the guard has judged the reply so far.

    Deltas are held back `every` at a time (and at the end); the guard judges the whole reply up to
    them, and they are released if it passes. If it blocks, the generation is cancelled and the last
    item says so: no text, finish_reason `content_filter`, the verdict under `guard`. Errors pass
    straight through.
    """

    def __init__(self, first: dict, stream, judge: Callable[[str], Awaitable[dict | None]], every: int):
        self.stream, self.judge, self.every = stream, judge, every
        self.held, self.ready, self.text, self.ended = [first], deque(), "", False

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        while not self.ready:
            if self.ended and not self.held:
                raise StopAsyncIteration
            await self._judge_next()
        return self.ready.popleft()

    def cancel(self) -> None:
        self.stream.cancel()

    async def _judge_next(self) -> None:
        held, self.held = self.held, []
        while not self.ended and len(held) < self.every and (not held or held[-1]["finish_reason"] is None):
            try:
                item = await self.stream.__anext__()
            except StopAsyncIteration:
                self.ended = True
                break
            if _failed(item) is not None:
                self.ready.extend(held + [item])
                self.ended = True
                return
            held.append(item)
        if held and held[-1]["finish_reason"] is not None:
            self.ended = True
        if not held:
            return
        self.text += "".join(item["text"] for item in held)
        verdict = await self.judge(self.text)
        last = held[-1]
        earlier = {k: v for item in held for k, v in item.get("guard", {}).items()}  # the prompt's verdict, if any
        reported = {**earlier, "output": verdict}
        if verdict is not None and verdict["decision"] == "block":
            self.stream.cancel()
            self.ended = True
            self.ready.append({**{k: v for k, v in last.items() if k != "logprobs"}, "text": "",
                               "finish_reason": "content_filter", "guard": reported})
            return
        if verdict is not None and verdict["flagged"]:
            held[-1] = {**last, "guard": reported}
        self.ready.extend(held)


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
@serve.ingress(api)
class OpenAIServer:
    """Routes OpenAI requests by `model` to the base or chat deployment; enforces API keys, body
    size and content type, and the request timeout."""

    def __init__(self, base: tuple[DeploymentHandle, str, str] | None, chat: tuple[DeploymentHandle, str, str] | None,
                 api_keys: list[str], max_body_bytes: int, request_timeout_s: float = 600,
                 guard: tuple[DeploymentHandle, str, str, dict] | None = None):
        self.completion_models = {base[1]: base[0]} if base else {}
        self.chat_models = {chat[1]: chat[0]} if chat else {}
        self.sources = {served[1]: served[2] for served in (base, chat, guard) if served}  # what each name serves
        self.guard, self.guard_name, _, policy = guard or (None, None, None, None)
        self.policy = GuardArgs.model_validate(policy) if policy else None
        if self.guard is not None:
            self.guard_decisions = Counter("corral_guard_decisions", "guard verdicts by direction (input, output) "
                                           "and decision (pass, flag, block)", tag_keys=("direction", "decision"))
            self.guard_latency = Histogram("corral_guard_latency_s", "seconds the guard took to judge a turn",
                                           [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5], tag_keys=("direction",))
        env_keys = [k.strip() for k in os.environ.get("CORRAL_API_KEYS", "").split(",") if k.strip()]
        self.api_keys = [k.encode() for k in (api_keys or env_keys)]
        self.max_body_bytes, self.timeout_s = max_body_bytes, request_timeout_s
        self.created = int(time.time())

    @api.get("/health")
    async def health(self):
        """200 {"status": "ok"} when every model replica answers that it can serve, else 503 naming why."""
        problems = {}
        guards = {self.guard_name: self.guard} if self.guard is not None else {}
        for name, handle in [*self.completion_models.items(), *self.chat_models.items(), *guards.items()]:
            try:
                reason = await asyncio.wait_for(handle.health.remote(), HEALTH_TIMEOUT_S)
            except Exception as e:  # a replica that is gone or stuck is as unhealthy as one that says so
                reason = f"no answer ({type(e).__name__})"
            if reason is not None:
                problems[name] = reason
        if problems:
            return JSONResponse({"status": "unhealthy", "models": problems}, status_code=503)
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        names = [*self.completion_models, *self.chat_models, *([self.guard_name] if self.guard else [])]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": self.created, "owned_by": "corral",
                                            "root": self.sources[n]} for n in names]}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        req = await self._parse(request, CompletionRequest)
        handle = self._handle(req.model, self.completion_models, "/v1/completions")
        payloads = [{"prompt": p, "max_tokens": req.max_tokens, "sampling": req.sampling(), "echo": req.echo}
                    for p in req.prompts()]
        rid = new_id("cmpl")
        if req.stream:
            first, stream = await self._start(handle, payloads[0])
            echo = first.get("echo")

            def chunk(item):
                nonlocal echo
                choice, echo = _completion_choice(0, item, echo), None  # the echo leads the first chunk only
                return completion_body(rid, req.model, [choice])

            def usage_chunk(usage):
                return completion_body(rid, req.model, [], usage=usage)

            return _sse_response(first, stream, chunk, self.timeout_s, usage_chunk if req.include_usage else None)
        results = await self._generate(handle, payloads)
        choices = [_completion_choice(i, {"text": r.text, "finish_reason": r.last["finish_reason"],
                                          "logprobs": r.tokens}, r.echo) for i, r in enumerate(results)]
        usage = Usage.of(sum(r.last["prompt_tokens"] for r in results), sum(r.last["completion_tokens"]
                                                                            for r in results))
        return completion_body(rid, req.model, choices, usage)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        req = await self._parse(request, ChatCompletionRequest)
        handle = self._handle(req.model, self.chat_models, "/v1/chat/completions")
        dialog = req.dialog()
        payload = {"messages": dialog, "sampling": req.sampling(),
                   "max_tokens": req.max_completion_tokens or req.max_tokens}
        rid = new_id("chatcmpl")
        checked = await self._judge(dialog, "input", rid)
        if checked is not None and checked["decision"] == "block":
            first, stream = {"text": self.policy.refusal, "finish_reason": "content_filter", "prompt_tokens": 0,
                             "completion_tokens": 0, "guard": {"input": checked}}, _Ended()
        else:
            first, stream = await self._start(handle, payload)
            if checked is not None and checked["flagged"]:
                first = {**first, "guard": {"input": checked}}
            if self.policy is not None and self.policy.output != "off":
                def judge(reply: str):
                    return self._judge([*dialog, {"role": "assistant", "content": reply}], "output", rid)

                stream = _Screened(first, stream, judge, self.policy.screen_every)
                first = await anext(stream)
        if req.stream:
            def chunk(item):
                body = chat_chunk(rid, req.model, {"content": item["text"]}, item["finish_reason"],
                                  tokens=item.get("logprobs"))
                return body | ({"guard": item["guard"]} if "guard" in item else {})

            def usage_chunk(usage):
                return chat_chunk(rid, req.model, None, usage=usage)

            opening = chat_chunk(rid, req.model, {"role": "assistant", "content": ""})
            return _sse_response(first, stream, chunk, self.timeout_s, usage_chunk if req.include_usage else None,
                                 opening)
        result = await self._within_timeout(_collect(first, stream))
        guard = {k: v for item in (first, result.last) for k, v in item.get("guard", {}).items()}
        blocked = result.last["finish_reason"] == "content_filter"
        body = chat_body(rid, req.model, self.policy.refusal if blocked else result.text, result.last["finish_reason"],
                         _usage(result.last), result.tokens)
        return body | ({"guard": guard} if guard else {})

    @api.post("/v1/moderations")
    async def moderations(self, request: Request) -> dict:
        """OpenAI's moderations: each input judged by the guard as a user message."""
        req = await self._parse(request, ModerationRequest)
        if self.guard is None:
            raise APIError(404, "no guard model is served here: name one in the Serve config's args.guard",
                           param="model", code="model_not_found")
        if req.model not in (None, self.guard_name):
            raise APIError(404, f"the model {req.model!r} is not served at /v1/moderations; served there: "
                                f"{self.guard_name}", param="model", code="model_not_found")
        verdicts = await self._within_timeout(asyncio.gather(
            *(self.guard.assess.remote([{"role": "user", "content": text}]) for text in req.input)))
        categories = await self.guard.categories.remote()
        return moderation_body(new_id("modr"), self.guard_name, verdicts, categories)

    # -- helpers -------------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if not self.api_keys:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(401, "no API key given: send the header 'Authorization: Bearer YOUR_KEY'",
                           code="missing_api_key")
        if not any(hmac.compare_digest(key.strip().encode(), k) for k in self.api_keys):
            raise APIError(401, "the API key given is not valid; check CORRAL_API_KEYS or the Serve config's "
                                "api_keys", code="invalid_api_key")

    async def _parse(self, request: Request, schema):
        """The request model of a JSON body read up to the size limit (chunked bodies too)."""
        self._authorize(request)
        content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise APIError(415, f"the request body must be JSON: send 'Content-Type: application/json', not "
                                f"{content_type!r}", code="unsupported_media_type")
        declared = request.headers.get("content-length", "0")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _too_large(self.max_body_bytes)
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > self.max_body_bytes:
                raise _too_large(self.max_body_bytes)
            parts.append(part)
        return parse_request(b"".join(parts), schema)

    def _handle(self, model: str, served: dict[str, DeploymentHandle], endpoint: str) -> DeploymentHandle:
        if model not in served:
            names = ", ".join(served) or "none"
            raise APIError(404, f"the model {model!r} does not exist or is not served at {endpoint}; "
                                f"served there: {names}", param="model", code="model_not_found")
        return served[model]

    async def _start(self, handle: DeploymentHandle, payload: dict):
        """Send the request to a model replica and wait for its first delta (or its error)."""
        stream = handle.options(stream=True).generate.remote(payload)
        try:
            first = await asyncio.wait_for(stream.__anext__(), self.timeout_s)
        except BackPressureError:
            raise APIError(503, f"the model is overloaded: its request queue is full; retry after "
                                f"{RETRY_AFTER_S} s", type="server_error", code="overloaded",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except TimeoutError:
            stream.cancel()
            raise _timed_out(self.timeout_s) from None
        except BaseException:  # cancelled (the client left, or another prompt of the request failed)
            stream.cancel()
            raise
        if (error := _failed(first)) is not None:
            stream.cancel()
            raise error
        return first, stream

    async def _judge(self, messages: list[dict], direction: str, rid: str) -> dict | None:
        """The guard's verdict on the last message, with the policy's `decision` (pass, flag or
        block), counted and timed; None when this direction is not screened."""
        if self.guard is None or getattr(self.policy, direction) == "off":
            return None
        start = time.perf_counter()
        verdict = await self.guard.assess.remote(messages)
        self.guard_latency.observe(time.perf_counter() - start, tags={"direction": direction})
        decision = "pass" if not verdict["flagged"] else getattr(self.policy, direction)
        self.guard_decisions.inc(tags={"direction": direction, "decision": decision})
        if decision == "block":  # the request's text only where the operator asked for it
            log.warning("corral guard: blocked the %s of %s (categories %s)%s", direction, rid,
                        ",".join(verdict["categories"]),
                        f": {messages[-1]['content']!r}" if self.policy.log_content else "")
        return verdict | {"decision": decision}

    async def _within_timeout(self, work: Awaitable):
        try:
            async with asyncio.timeout(self.timeout_s):
                return await work
        except TimeoutError:
            raise _timed_out(self.timeout_s) from None

    async def _generate(self, handle: DeploymentHandle, payloads: list[dict]) -> list[_Result]:
        """Whole generations of every payload, side by side, within the request timeout."""
        async def one(payload: dict) -> _Result:
            return await _collect(*await self._start(handle, payload))

        tasks = [asyncio.ensure_future(one(p)) for p in payloads]
        try:
            async with asyncio.timeout(self.timeout_s):
                return await asyncio.gather(*tasks)
        except TimeoutError:
            raise _timed_out(self.timeout_s) from None
        finally:
            for task in tasks:  # one failed or the client left: stop the others' generation too
                task.cancel()
