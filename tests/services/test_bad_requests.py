"""Every kind of bad request gets a 4xx with OpenAI's error body, never a 5xx, and the replicas stay
healthy, on both engines (the `limited` app's auth cases run on the corral engine only: the
ingress checks them before any engine)."""

from __future__ import annotations

import httpx
import pytest

from tests.services.conftest import API_KEY

pytestmark = pytest.mark.slow

C, CHAT = "/v1/completions", "/v1/chat/completions"
OK_C = {"model": "corral-base", "prompt": "Hello", "max_tokens": 2}
OK_CHAT = {"model": "corral-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
USER = {"role": "user", "content": "Hi"}
LONG_PROMPT = "the king " * 400  # far beyond the tiny preset's 256-token context

# (id, app, method, path, body: dict | bytes, headers, status, code, param)
CASES = [
    ("invalid-json", "corral", "POST", C, b'{"model": "corral-base",', {}, 400, "invalid_json", None),
    ("body-not-an-object", "corral", "POST", C, b"[1, 2]", {}, 400, "invalid_json", None),
    ("body-not-utf8", "corral", "POST", C, b"\xff\xfe\x00", {}, 400, "invalid_json", None),
    ("missing-model", "corral", "POST", C, {"prompt": "Hi"}, {}, 400, "missing_required_parameter", "model"),
    ("missing-prompt", "corral", "POST", C, {"model": "corral-base"}, {}, 400, "missing_required_parameter", "prompt"),
    ("missing-messages", "corral", "POST", CHAT, {"model": "corral-chat"}, {}, 400, "missing_required_parameter",
     "messages"),
    ("unknown-model", "corral", "POST", C, OK_C | {"model": "gpt-9"}, {}, 404, "model_not_found", "model"),
    ("chat-model-on-completions", "corral", "POST", C, OK_C | {"model": "corral-chat"}, {}, 404, "model_not_found",
     "model"),
    ("base-model-on-chat", "corral", "POST", CHAT, OK_CHAT | {"model": "corral-base"}, {}, 404, "model_not_found",
     "model"),
    ("model-wrong-type", "corral", "POST", C, OK_C | {"model": 7}, {}, 400, "invalid_value", "model"),
    ("empty-messages", "corral", "POST", CHAT, OK_CHAT | {"messages": []}, {}, 400, "invalid_value", "messages"),
    ("messages-not-a-list", "corral", "POST", CHAT, OK_CHAT | {"messages": "Hi"}, {}, 400, "invalid_value",
     "messages"),
    ("non-alternating-messages", "corral", "POST", CHAT, OK_CHAT | {"messages": [USER, USER]}, {}, 400,
     "invalid_messages", "messages"),
    ("last-message-from-assistant", "corral", "POST", CHAT,
     OK_CHAT | {"messages": [USER, {"role": "assistant", "content": "Hello"}]}, {}, 400, "invalid_messages", "messages"),
    ("system-message-alone", "corral", "POST", CHAT,
     OK_CHAT | {"messages": [{"role": "system", "content": "Be brief."}]}, {}, 400, "invalid_messages", "messages"),
    ("unknown-role", "corral", "POST", CHAT, OK_CHAT | {"messages": [{"role": "robot", "content": "Hi"}]}, {}, 400,
     "invalid_value", "messages.0.role"),
    ("content-wrong-type", "corral", "POST", CHAT, OK_CHAT | {"messages": [{"role": "user", "content": 5}]}, {}, 400,
     "invalid_value", "messages.0.content"),
    ("reserved-chat-tag", "corral", "POST", CHAT,
     OK_CHAT | {"messages": [{"role": "user", "content": "[INST] hi"}]}, {}, 400, "invalid_messages", "messages"),
    ("negative-max-tokens", "corral", "POST", C, OK_C | {"max_tokens": -5}, {}, 400, "invalid_value", "max_tokens"),
    ("zero-max-tokens", "corral", "POST", CHAT, OK_CHAT | {"max_tokens": 0}, {}, 400, "invalid_value", "max_tokens"),
    ("huge-max-tokens", "corral", "POST", C, OK_C | {"max_tokens": 10**9}, {}, 400, "context_length_exceeded",
     "max_tokens"),
    ("max-tokens-as-string", "corral", "POST", C, OK_C | {"max_tokens": "10"}, {}, 400, "invalid_value", "max_tokens"),
    ("temperature-too-high", "corral", "POST", C, OK_C | {"temperature": 3.5}, {}, 400, "invalid_value",
     "temperature"),
    ("temperature-negative", "corral", "POST", CHAT, OK_CHAT | {"temperature": -0.1}, {}, 400, "invalid_value",
     "temperature"),
    ("top-p-above-one", "corral", "POST", C, OK_C | {"top_p": 1.5}, {}, 400, "invalid_value", "top_p"),
    ("top-k-negative", "corral", "POST", C, OK_C | {"top_k": -1}, {}, 400, "invalid_value", "top_k"),
    ("prompt-longer-than-context", "corral", "POST", C, OK_C | {"prompt": LONG_PROMPT}, {}, 400,
     "context_length_exceeded", "prompt"),
    ("chat-longer-than-context", "corral", "POST", CHAT,
     OK_CHAT | {"messages": [{"role": "user", "content": LONG_PROMPT}]}, {}, 400, "context_length_exceeded",
     "messages"),
    ("chat-longer-than-context-no-max-tokens", "corral", "POST", CHAT,
     {"model": "corral-chat", "messages": [{"role": "user", "content": LONG_PROMPT}]}, {}, 400,
     "context_length_exceeded", "messages"),
    ("prompt-token-out-of-vocab", "corral", "POST", C, OK_C | {"prompt": [1, 10**6]}, {}, 400, "invalid_value",
     "prompt"),
    ("prompt-empty-token-list", "corral", "POST", C, OK_C | {"prompt": []}, {}, 400, "invalid_value", "prompt"),
    ("unknown-field", "corral", "POST", C, OK_C | {"frobnicate": True}, {}, 400, "unknown_parameter", "frobnicate"),
    ("top-logprobs-without-logprobs", "corral", "POST", CHAT, OK_CHAT | {"top_logprobs": 2}, {}, 400,
     "invalid_value", None),
    # numbers beyond what the engine and torch take (one of them once killed the engine's thread)
    ("max-tokens-beyond-int32", "corral", "POST", C, OK_C | {"max_tokens": 1 << 31}, {}, 400, "invalid_value",
     "max_tokens"),
    ("max-completion-tokens-beyond-int32", "corral", "POST", CHAT, OK_CHAT | {"max_completion_tokens": 1 << 40}, {},
     400, "invalid_value", "max_completion_tokens"),
    ("top-k-beyond-int64", "corral", "POST", C, OK_C | {"top_k": 1 << 64}, {}, 400, "invalid_value", "top_k"),
    ("top-k-beyond-int32", "corral", "POST", CHAT, OK_CHAT | {"top_k": 1 << 40}, {}, 400, "invalid_value", "top_k"),
    ("seed-beyond-uint64", "corral", "POST", C, OK_C | {"seed": 1 << 64}, {}, 400, "invalid_value", "seed"),
    ("seed-below-int64", "corral", "POST", CHAT, OK_CHAT | {"seed": -(1 << 63) - 1}, {}, 400, "invalid_value",
     "seed"),
    ("logprobs-above-20", "corral", "POST", C, OK_C | {"logprobs": 21}, {}, 400, "invalid_value", "logprobs"),
    ("top-logprobs-above-20", "corral", "POST", CHAT, OK_CHAT | {"logprobs": True, "top_logprobs": 99}, {}, 400,
     "invalid_value", "top_logprobs"),
    ("prompt-token-beyond-int64", "corral", "POST", C, OK_C | {"prompt": [1, 1 << 70]}, {}, 400, "invalid_value",
     "prompt"),
    ("temperature-nan", "corral", "POST", C, b'{"model": "corral-base", "prompt": "Hi", "temperature": NaN}', {}, 400,
     "invalid_value", "temperature"),
    ("top-p-infinity", "corral", "POST", CHAT,
     b'{"model": "corral-chat", "messages": [{"role": "user", "content": "Hi"}], "top_p": Infinity}', {}, 400,
     "invalid_value", "top_p"),
    # text that is not Unicode: a lone UTF-16 surrogate, which JSON escapes can write
    ("surrogate-in-prompt", "corral", "POST", C, b'{"model": "corral-base", "prompt": "Hi \\ud800 there"}', {}, 400,
     "invalid_value", "prompt"),
    ("surrogate-in-message", "corral", "POST", CHAT,
     b'{"model": "corral-chat", "messages": [{"role": "user", "content": "\\udfff"}]}', {}, 400, "invalid_value",
     "messages.0.content"),
    ("surrogate-in-stop", "corral", "POST", C, b'{"model": "corral-base", "prompt": "Hi", "stop": ["a", "\\ud83d"]}',
     {}, 400, "invalid_value", "stop.1"),
    ("surrogate-in-user", "corral", "POST", CHAT,
     b'{"model": "corral-chat", "messages": [{"role": "user", "content": "Hi"}], "user": "\\ud800"}', {}, 400,
     "invalid_value", "user"),
    ("surrogate-in-model", "corral", "POST", C, b'{"model": "\\ud800", "prompt": "Hi"}', {}, 400, "invalid_value",
     "model"),
    ("deeply-nested-json", "corral", "POST", C, b'{"model": "corral-base", "prompt": ' + b"[" * 5000 + b"]" * 5000
     + b"}", {}, 400, "invalid_json", None),
    ("wrong-content-type", "corral", "POST", C, OK_C, {"Content-Type": "text/plain"}, 415, "unsupported_media_type",
     None),
    ("form-content-type", "corral", "POST", CHAT, OK_CHAT, {"Content-Type": "application/x-www-form-urlencoded"}, 415,
     "unsupported_media_type", None),
    ("too-many-stop-strings", "corral", "POST", C, OK_C | {"stop": ["a", "b", "c", "d", "e"]}, {}, 400,
     "invalid_value", "stop"),
    ("empty-stop-string", "corral", "POST", C, OK_C | {"stop": [""]}, {}, 400, "invalid_value", "stop"),
    ("n-above-one", "corral", "POST", C, OK_C | {"n": 2}, {}, 400, "invalid_value", "n"),
    ("stream-wrong-type", "corral", "POST", C, OK_C | {"stream": "yes"}, {}, 400, "invalid_value", "stream"),
    ("seed-not-an-integer", "corral", "POST", C, OK_C | {"seed": 1.5}, {}, 400, "invalid_value", "seed"),
    ("stream-options-unknown-field", "corral", "POST", C, OK_C | {"stream": True, "stream_options": {"x": 1}}, {},
     400, "unknown_parameter", "stream_options.x"),
    ("oversized-body", "corral", "POST", C, OK_C | {"prompt": "x" * (2 << 20)}, {}, 413, "request_too_large", None),
    ("wrong-method", "corral", "GET", C, b"", {}, 405, "method_not_allowed", None),
    ("unknown-path", "corral", "POST", "/v1/embeddings", OK_C, {}, 404, "unknown_url", None),
    ("missing-api-key", "limited", "POST", C, OK_C, {}, 401, "missing_api_key", None),
    ("wrong-api-key", "limited", "POST", C, OK_C, {"Authorization": "Bearer sk-wrong"}, 401, "invalid_api_key", None),
    ("wrong-auth-scheme", "limited", "POST", C, OK_C, {"Authorization": f"Basic {API_KEY}"}, 401, "missing_api_key",
     None),
    ("models-without-api-key", "limited", "GET", "/v1/models", b"", {}, 401, "missing_api_key", None),
]


def check_error(response: httpx.Response, status: int, code: str, param: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"]) == (code, param), error
    assert error["type"] == "invalid_request_error" and len(error["message"]) > 10


def good_request_completes(url: str) -> None:
    """A good request right after a bad one: answered (a wedged replica would hang past the timeout)."""
    ok = httpx.post(f"{url}/v1/completions", json=OK_C, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1, ok.text


ENGINE_CASES = [("corral", c) for c in CASES] + [("vllm", c) for c in CASES if c[1] == "corral"]


def app_of(request, engine: str):
    return request.getfixturevalue("serve_app" if engine == "corral" else "vllm_app")


@pytest.mark.parametrize("engine, case", ENGINE_CASES, ids=[f"{e}-{c[0]}" for e, c in ENGINE_CASES])
def test_bad_request_gets_an_openai_error(request, engine, case):
    _, app, method, path, body, headers, status, code, param = case
    url = app_of(request, engine).url
    root = url + ("/limited" if app == "limited" else "")
    content = body if isinstance(body, bytes) else httpx.Request("POST", "/", json=body).content
    response = httpx.request(method, root + path, content=content, timeout=60,
                             headers={"Content-Type": "application/json", **headers})
    check_error(response, status, code, param)
    good_request_completes(url)


def test_an_oversized_chunked_body_is_refused_before_it_is_read_whole(serve_app):
    def chunks():  # no Content-Length: the server learns the size only by reading
        yield b'{"model": "corral-base", "prompt": "'
        for _ in range(40):
            yield b"x" * (64 << 10)
        yield b'"}'

    response = httpx.post(f"{serve_app.v1}/completions", content=chunks(), timeout=60,
                          headers={"Content-Type": "application/json"})
    assert "content-length" not in response.request.headers
    check_error(response, 413, "request_too_large", None)
    good_request_completes(serve_app.url)


def test_there_are_at_least_50_kinds():
    assert len(CASES) >= 50 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("engine", ["corral", "vllm"])
def test_replicas_stay_healthy_after_the_bad_requests(request, engine):
    """Runs after the table (pytest keeps file order): every model answers and holds no leaked slot."""
    served = app_of(request, engine)
    assert httpx.get(f"{served.url}/health").status_code == 200
    ok = httpx.post(f"{served.v1}/completions", json=OK_C, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    assert httpx.post(f"{served.v1}/chat/completions", json=OK_CHAT, timeout=60).status_code == 200
    for name in ("base", "chat"):
        stats = served.serve.get_deployment_handle(name, app_name=served.app).stats.remote().result()
        assert stats["slots_used"] == 0 and stats["waiting"] == 0
