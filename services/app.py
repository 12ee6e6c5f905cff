"""The OpenAI-compatible Serve application: one model-server deployment bound as `base` and `chat`.

    client --HTTP--> Serve proxy --> OpenAIServer (FastAPI ingress) --handle, streaming--> base | chat

`ModelServer` wraps a continuous-batching `corral.engine.Engine`; every request streams its
deltas back over a DeploymentHandle, and the ingress turns them into one JSON response or into
Server-Sent Events. Replica counts, autoscaling, `max_ongoing_requests`, `max_queued_requests` and
`accelerator_type` come from the Serve config file (services/configs/), never from this code.

`build_app` is the config's `import_path` (services.app:build_app); its `args` are `AppArgs`.
"""

import hmac
import os
import time
from collections.abc import AsyncIterator
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Gauge, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException

import corral
from corral.engine import Engine, SamplingParams
from corral.registry import resolve_model
from corral.tokenizer import ChatFormatError
from services.api import (
    APIError, ChatCompletionRequest, CompletionRequest, Usage, chat_body, chat_chunk, completion_body, new_id,
    parse_request, sse,
)

RETRY_AFTER_S = 1  # what an overloaded deployment asks clients to wait


# -- configuration ------------------------------------------------------------------------------------
class ModelArgs(BaseModel):
    """One served model: where its checkpoint is and how the engine runs it."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="checkpoint path or models:/NAME@ALIAS; None = env var")
    served_name: str = Field(min_length=1, description="the `model` clients ask for")
    max_batch_size: int = Field(default=32, ge=1, description="KV-cache slots: requests decoded together")
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = Field(default="auto", description="torch device; auto = cuda when the replica has a GPU")
    batch_invariant: bool = Field(default=True, description="greedy tokens under load = alone (slower at batch 1)")
    num_threads: int | None = Field(default=None, ge=1, description="torch CPU threads; None = Ray's default")


class AppArgs(BaseModel):
    """The `args` of the Serve config's application."""

    model_config = ConfigDict(extra="forbid")

    base: ModelArgs | None = None
    chat: ModelArgs | None = None
    api_keys: list[str] = Field(default_factory=list, description="Bearer keys; empty = CORRAL_API_KEYS or none")
    max_body_bytes: int = Field(default=1 << 20, ge=1024)


MODEL_ENV = {"base": "CORRAL_BASE_MODEL", "chat": "CORRAL_CHAT_MODEL"}


def build_app(args: dict) -> serve.Application:
    """The Serve application from the config's `args`; a model's path may come from its env var."""
    config = AppArgs.model_validate(args)
    handles = {}
    for role in ("base", "chat"):
        model_args = getattr(config, role)
        if model_args is None:
            continue
        source = model_args.model or os.environ.get(MODEL_ENV[role])
        if not source:
            raise ValueError(f"no checkpoint for the {role} model: set args.{role}.model in the Serve config "
                             f"or the {MODEL_ENV[role]} environment variable (a path or models:/NAME@ALIAS)")
        bound_args = model_args.model_dump() | {"model": source, "chat": role == "chat"}
        handles[role] = (ModelServer.options(name=role).bind(**bound_args), model_args.served_name)
    if not handles:
        raise ValueError("the Serve config's args name no model: give args.base and/or args.chat")
    return OpenAIServer.bind(handles.get("base"), handles.get("chat"), config.api_keys, config.max_body_bytes)


# -- the model server ------------------------------------------------------------------------------------
@serve.deployment(ray_actor_options={"num_cpus": 1})
class ModelServer:
    """One model behind a continuous-batching engine; `generate` streams a request's deltas."""

    def __init__(self, model: str, served_name: str, chat: bool = False, max_batch_size: int = 32,
                 dtype: str = "float32", device: str = "auto", batch_invariant: bool = True,
                 num_threads: int | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        path = resolve_model(model)
        self.name, self.chat = served_name, chat
        self.tokenizer = corral.load_tokenizer(path)
        weights = corral.load_model(path, getattr(torch, dtype)).to(device)
        self.engine = Engine(weights, self.tokenizer, max_batch_size, batch_invariant=batch_invariant)
        self.engine.start()
        self.metrics = _Metrics(served_name)

    def stats(self) -> dict[str, int]:
        """The engine's running/queued requests and cache slots, as the metrics report them."""
        return self.engine.stats()

    async def generate(self, request: dict) -> AsyncIterator[dict]:
        """Yield {"error", "status"} for a bad request, else deltas {"text", "finish_reason", usage counts}."""
        try:
            prompt, params = self._prepare(request)
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
                last, finished = now, out.finished
                yield {"text": out.text, "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens,
                       "completion_tokens": out.completion_tokens}
        finally:
            if not finished:
                self.metrics.cancelled.inc()
            self.metrics.report(self.engine.stats())

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
def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the request body has {size} bytes, more than the limit of {limit}; send a shorter "
                         f"prompt", code="request_too_large")


def _usage(item: dict) -> Usage:
    return Usage.of(item["prompt_tokens"], item["completion_tokens"])


async def _collect(first: dict, stream) -> tuple[str, dict]:
    """The whole text of a non-streaming request, and its last delta (finish reason and usage)."""
    parts, last = [first["text"]], first
    async for item in stream:
        parts.append(item["text"])
        last = item
    return "".join(parts), last


def _sse_response(first: dict, stream, chunk, usage_chunk=None, opening: dict | None = None) -> StreamingResponse:
    """Server-Sent Events in OpenAI's chunk format, ending with `data: [DONE]`.

    If the client disconnects, Serve cancels this generator; cancelling the handle's stream then
    cancels the replica's generation, which frees its cache slot.
    """
    async def events():
        last = first
        try:
            if opening is not None:
                yield sse(opening)
            yield sse(chunk(first))
            async for item in stream:
                last = item
                yield sse(chunk(item))
            if usage_chunk is not None:
                yield sse(usage_chunk(_usage(last)))
            yield sse("[DONE]")
        finally:
            stream.cancel()

    return StreamingResponse(events(), media_type="text/event-stream")


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
@serve.ingress(api)
class OpenAIServer:
    """Routes OpenAI requests by `model` to the base or chat deployment; enforces API keys and body size."""

    def __init__(self, base: tuple[DeploymentHandle, str] | None, chat: tuple[DeploymentHandle, str] | None,
                 api_keys: list[str], max_body_bytes: int):
        self.completion_models = dict([base[::-1]]) if base else {}
        self.chat_models = dict([chat[::-1]]) if chat else {}
        env_keys = [k.strip() for k in os.environ.get("CORRAL_API_KEYS", "").split(",") if k.strip()]
        self.api_keys = [k.encode() for k in (api_keys or env_keys)]
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        names = [*self.completion_models, *self.chat_models]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": self.created, "owned_by": "corral"}
                                           for n in names]}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        req = await self._parse(request, CompletionRequest)
        handle = self._handle(req.model, self.completion_models, "/v1/completions")
        first, stream = await self._start(handle, {"prompt": req.prompt, "max_tokens": req.max_tokens,
                                                   "sampling": req.sampling()})
        rid = new_id("cmpl")
        if req.stream:
            def chunk(item):
                return completion_body(rid, req.model, item["text"], item["finish_reason"])

            def usage_chunk(usage):
                return completion_body(rid, req.model, None, usage=usage)

            return _sse_response(first, stream, chunk, usage_chunk if req.include_usage else None)
        text, last = await _collect(first, stream)
        return completion_body(rid, req.model, text, last["finish_reason"], _usage(last))

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        req = await self._parse(request, ChatCompletionRequest)
        handle = self._handle(req.model, self.chat_models, "/v1/chat/completions")
        first, stream = await self._start(handle, {"messages": req.dialog(), "sampling": req.sampling(),
                                                   "max_tokens": req.max_completion_tokens or req.max_tokens})
        rid = new_id("chatcmpl")
        if req.stream:
            def chunk(item):
                return chat_chunk(rid, req.model, {"content": item["text"]}, item["finish_reason"])

            def usage_chunk(usage):
                return chat_chunk(rid, req.model, None, usage=usage)

            opening = chat_chunk(rid, req.model, {"role": "assistant", "content": ""})
            return _sse_response(first, stream, chunk, usage_chunk if req.include_usage else None, opening)
        text, last = await _collect(first, stream)
        return chat_body(rid, req.model, text, last["finish_reason"], _usage(last))

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
        self._authorize(request)
        declared = request.headers.get("content-length", "0")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _too_large(int(declared), self.max_body_bytes)
        raw = await request.body()
        if len(raw) > self.max_body_bytes:
            raise _too_large(len(raw), self.max_body_bytes)
        return parse_request(raw, schema)

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
            first = await stream.__anext__()
        except BackPressureError:
            raise APIError(503, f"the model is overloaded: its request queue is full; retry after "
                                f"{RETRY_AFTER_S} s", type="server_error", code="overloaded",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        if "error" in first:
            stream.cancel()
            raise APIError(first["status"], **first["error"])
        return first, stream
