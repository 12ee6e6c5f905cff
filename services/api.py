"""OpenAI's completions and chat-completions API: request and response models, and its error format.

Requests are strict: an unknown field, a wrong type, a number out of the range the engine
accepts, text that is not valid Unicode or JSON nested deeper than `MAX_JSON_DEPTH` is a 400
whose body names the parameter, as `{"error": {"message", "type", "param", "code"}}`. `top_k` is
the one extension (vLLM's), passed by OpenAI clients through `extra_body`.

Log-probabilities come in OpenAI's (and vLLM's) shapes: completions' `logprobs` (top N) and
`echo` (the prompt's tokens with theirs, as lm-evaluation-harness scores multiple choice), chat's
`logprobs` / `top_logprobs`. They are the model's raw log-probabilities (before temperature).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_JSON_DEPTH = 32  # a real request nests 4 levels; thousands would exhaust the parser's stack
MAX_LOGPROBS = 20  # top log-probabilities per token (vLLM's limit; OpenAI's is 5 for completions)
MAX_PROMPTS = 64  # prompts in one completions request (one choice each)
INT32_MAX, INT64_MIN, UINT64_MAX = (1 << 31) - 1, -(1 << 63), (1 << 64) - 1


class APIError(Exception):
    """An error answered to the client with an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def json_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in a JSON text, without parsing it (brackets inside strings
    do not count)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # closing quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def invalid_text(value, path: str = "") -> str | None:
    """The path of the first string in a parsed JSON value that is not valid Unicode (a lone
    UTF-16 surrogate, which JSON's \\u escapes can write), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return None
        except UnicodeEncodeError:
            return path or "body"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        where = f"{path}.{key}" if path else str(key)
        if found := (isinstance(key, str) and invalid_text(key, where)) or invalid_text(item, where):
            return found
    return None


def parse_request(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """A request model from a JSON body, or an APIError naming the first bad parameter."""
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise APIError(400, f"the request body nests JSON deeper than {MAX_JSON_DEPTH} levels; send a flat "
                            f"request object", code="invalid_json")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    if (param := invalid_text(data)) is not None:
        raise APIError(400, f"{param}: the text is not valid Unicode (a lone UTF-16 surrogate); send UTF-8 text",
                       param=param, code="invalid_value")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(part) for part in err["loc"]) or None
        code = "unknown_parameter" if err["type"] == "extra_forbidden" else "invalid_value"
        if err["type"] == "missing":
            code = "missing_required_parameter"
        message = f"{param}: {err['msg']}" if param else err["msg"]
        raise APIError(400, message, param=param, code=code) from None


# -- requests ---------------------------------------------------------------------------------------
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """The sampling fields completions and chat completions share."""

    model_config = STRICT

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, ge=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=INT32_MAX)
    n: int = Field(default=1, ge=1, le=1, description="one choice per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=UINT64_MAX)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def sampling(self) -> dict:
        """SamplingParams fields but max_tokens, which needs the prompt's length (the model server knows it)."""
        return {"temperature": self.temperature, "top_p": max(self.top_p, 1e-6),  # top_p 0: the top token only
                "top_k": self.top_k, "stop": self.stop or [], "seed": self.seed}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="text or token ids; a list of them is a batch, answered with one choice each")
    max_tokens: int | None = Field(default=16, ge=1, le=INT32_MAX)  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description="top log-probabilities per token")
    echo: bool = Field(default=False, description="the prompt's tokens come back before the completion's")

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one, or each of a batch."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)) or not self.prompt:
            return [self.prompt]
        if len(self.prompt) > MAX_PROMPTS:
            raise APIError(400, f"prompt: at most {MAX_PROMPTS} prompts in one request, got {len(self.prompt)}",
                           param="prompt", code="invalid_value")
        if self.stream and len(self.prompt) > 1:
            raise APIError(400, "prompt: stream one prompt per request", param="prompt", code="invalid_value")
        return list(self.prompt)

    def sampling(self) -> dict:
        return super().sampling() | {"logprobs": self.logprobs, "prompt_logprobs": self.logprobs if self.echo else None}


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)  # the newer name of max_tokens
    logprobs: bool = Field(default=False, description="the log-probability of each token of the reply")
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description="and the N most likely")

    @model_validator(mode="after")
    def _check_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def dialog(self) -> list[dict]:
        return [{"role": m.role, "content": m.content} for m in self.messages]

    def sampling(self) -> dict:
        return super().sampling() | {"logprobs": (self.top_logprobs or 0) if self.logprobs else None}


MAX_MODERATION_INPUTS = 64  # texts in one moderations request


class ModerationRequest(BaseModel):
    """OpenAI's moderations request: one text or a list, each judged as a user message."""

    model_config = STRICT
    input: str | list[str] = Field(description="text, or a list of texts, each judged on its own")
    model: str | None = Field(default=None, description="the guard's served name; None = the served guard")

    @field_validator("input")
    @classmethod
    def _check_input(cls, value):
        texts = [value] if isinstance(value, str) else value
        if not texts or len(texts) > MAX_MODERATION_INPUTS:
            raise ValueError(f"give 1 to {MAX_MODERATION_INPUTS} texts, got {len(texts)}")
        if any(not t.strip() for t in texts):
            raise ValueError("texts to moderate must not be empty")
        return texts


# -- responses ----------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_choice(index: int, text: str, finish_reason: str | None, tokens: list[dict] | None) -> dict:
    """One choice of a `text_completion`; `tokens` ({"token", "logprob", "top"} each, logprob None
    for an echoed first prompt token) become OpenAI's legacy logprobs object."""
    logprobs = None
    if tokens is not None:
        offsets = [0]
        for t in tokens[:-1]:
            offsets.append(offsets[-1] + len(t["token"]))
        logprobs = {"tokens": [t["token"] for t in tokens], "token_logprobs": [t["logprob"] for t in tokens],
                    "top_logprobs": [None if t["top"] is None else {x["token"]: x["logprob"] for x in t["top"]}
                                     for t in tokens],
                    "text_offset": offsets}
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_body(rid: str, model: str, choices: list[dict], usage: Usage | None = None) -> dict:
    """A `text_completion` object; a streamed chunk has the same shape (no choices: usage-only chunk)."""
    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage.model_dump()
    return body


def chat_logprobs(tokens: list[dict] | None) -> dict | None:
    """Chat's logprobs object: {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}."""
    if tokens is None:
        return None

    def entry(t: dict) -> dict:
        return {"token": t["token"], "logprob": t["logprob"], "bytes": list(t["token"].encode())}

    return {"content": [entry(t) | {"top_logprobs": [entry(x) for x in t["top"]]} for t in tokens]}


def chat_body(rid: str, model: str, text: str, finish_reason: str | None, usage: Usage,
              tokens: list[dict] | None = None) -> dict:
    message = {"role": "assistant", "content": text}
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": chat_logprobs(tokens),
                         "finish_reason": finish_reason}],
            "usage": usage.model_dump()}


def chat_chunk(rid: str, model: str, delta: dict | None, finish_reason: str | None = None,
               usage: Usage | None = None, tokens: list[dict] | None = None) -> dict:
    """A `chat.completion.chunk`; delta None makes the final usage-only chunk (no choices)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": chat_logprobs(tokens),
                                         "finish_reason": finish_reason}]
    body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices}
    if usage is not None:
        body["usage"] = usage.model_dump()
    return body


def sse(data: dict | str) -> str:
    """One Server-Sent Event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def category_key(name: str) -> str:
    """A taxonomy name as a moderation category key, in OpenAI's style ("Theft and burglary" ->
    "theft-and-burglary")."""
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def moderation_body(rid: str, model: str, verdicts: list[dict], categories: dict[str, str]) -> dict:
    """OpenAI's moderation object: per input `flagged`, `categories` (bool) and `category_scores`."""
    results = [{"flagged": v["flagged"],
                "categories": {category_key(name): code in v["categories"] for code, name in categories.items()},
                "category_scores": {category_key(name): v["category_scores"][code] for code, name in categories.items()}}
               for v in verdicts]
    return {"id": rid, "model": model, "results": results}
