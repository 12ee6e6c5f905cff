"""Concurrency, client disconnects, API keys and overload, against the real Serve app over HTTP."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.services.conftest import API_KEY, LIMITED_QUEUE

pytestmark = pytest.mark.slow

PROMPTS = [f"{subject} {verb}" for subject in ("The king", "My lord", "Sweet queen", "A fool")
           for verb in ("said", "went", "saw", "will", "shall", "bade", "fell", "knew")]  # 32 prompts


def stats(serve_app, deployment: str = "base", app: str = "corral") -> dict:
    return serve_app.serve.get_deployment_handle(deployment, app_name=app).stats.remote().result()


def test_32_concurrent_streams_equal_the_sequential_run(serve_app):
    """Greedy outputs under load are token-for-token the outputs of each request run alone."""
    kwargs = dict(model="corral-base", max_tokens=24, temperature=0)
    sync = openai.OpenAI(base_url=serve_app.v1, api_key="unused", max_retries=0, timeout=120)
    alone = [sync.completions.create(prompt=p, **kwargs).choices[0].text for p in PROMPTS]

    async def stream(client, prompt):
        chunks = [c async for c in await client.completions.create(
            prompt=prompt, stream=True, stream_options={"include_usage": True}, **kwargs)]
        return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage.completion_tokens

    async def all_at_once():
        client = openai.AsyncOpenAI(base_url=serve_app.v1, api_key="unused", max_retries=0, timeout=120,
                                    http_client=openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=64)))
        return await asyncio.gather(*(stream(client, p) for p in PROMPTS))

    together = asyncio.run(all_at_once())
    assert [text for text, _ in together] == alone
    assert all(0 < n <= 24 for _, n in together)
    assert stats(serve_app)["slots_used"] == 0


def test_disconnect_mid_stream_frees_the_slot(serve_app):
    before = stats(serve_app)["cancelled_total"]
    body = {"model": "corral-base", "prompt": "The king", "max_tokens": 250, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{serve_app.v1}/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[len("data: "):])["object"] == "text_completion"
        assert stats(serve_app)["slots_used"] == 1  # still generating when the client leaves
    deadline = time.time() + 15
    while (now := stats(serve_app))["cancelled_total"] == before or now["slots_used"]:
        assert time.time() < deadline, f"the slot was not freed after the disconnect: {now}"
        time.sleep(0.1)
    assert now["running"] == 0


def test_api_key_is_enforced_when_configured(serve_app):
    good = openai.OpenAI(base_url=serve_app.limited, api_key=API_KEY, max_retries=0, timeout=60)
    assert [m.id for m in good.models.list()] == ["corral-base"]
    assert good.completions.create(model="corral-base", prompt="Hi", max_tokens=3).usage.completion_tokens >= 1
    bad = openai.OpenAI(base_url=serve_app.limited, api_key="sk-nope", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.completions.create(model="corral-base", prompt="Hi", max_tokens=3)
    assert err.value.code == "invalid_api_key"
    # the main application has no keys configured: any key, or none, is fine
    assert httpx.get(f"{serve_app.v1}/models").status_code == 200


def test_overload_beyond_the_queue_answers_503_with_retry_after(serve_app):
    capacity = LIMITED_QUEUE["max_ongoing_requests"] + LIMITED_QUEUE["max_queued_requests"]
    body = {"model": "corral-base", "prompt": "The king", "max_tokens": 200, "temperature": 0}

    async def flood():
        async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
            return await asyncio.gather(*(client.post(f"{serve_app.limited}/completions", json=body)
                                          for _ in range(capacity + 8)))

    started = time.time()
    responses = asyncio.run(flood())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 503} and codes.count(200) >= LIMITED_QUEUE["max_ongoing_requests"], codes
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["Retry-After"] == "1"
    assert rejected.json()["error"]["code"] == "overloaded"
    assert time.time() - started < 60  # answered, not timed out
    assert stats(serve_app, app="limited")["slots_used"] == 0
