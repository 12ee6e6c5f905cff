"""The Serve app through the official `openai` client: completions and chat, streaming or not, on
both engines (corral's and vLLM's, the same models)."""

from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

BASE, CHAT = "corral-base", "corral-chat"


@pytest.fixture(scope="module")
def client(engine_app) -> openai.OpenAI:
    return openai.OpenAI(base_url=engine_app.v1, api_key="unused", max_retries=0, timeout=60)


def test_health_and_models(engine_app, client):
    assert httpx.get(f"{engine_app.url}/health").json() == {"status": "ok"}
    assert sorted(m.id for m in client.models.list()) == [BASE, CHAT]


def test_completion_with_usage(client, tokenizer):
    out = client.completions.create(model=BASE, prompt="The king said", max_tokens=12, temperature=0)
    choice = out.choices[0]
    assert out.object == "text_completion" and out.model == BASE
    assert out.usage.prompt_tokens == len(tokenizer.encode("The king said"))
    assert out.usage.completion_tokens == 12 and out.usage.total_tokens == out.usage.prompt_tokens + 12
    assert choice.finish_reason == "length" and choice.text


def test_chat_completion_multi_turn_with_system_prompt(client, tokenizer):
    messages = [{"role": "system", "content": "Answer in verse."}, {"role": "user", "content": "Who are you?"},
                {"role": "assistant", "content": "A player."}, {"role": "user", "content": "Of what?"}]
    out = client.chat.completions.create(model=CHAT, messages=messages, max_tokens=8, temperature=0)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(tokenizer.encode_chat(messages))  # Llama 2 template, both turns
    assert out.usage.completion_tokens <= 8


def test_streaming_equals_non_streaming_and_reports_usage(client):
    kwargs = dict(model=BASE, prompt="Now is the winter", max_tokens=20, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_streaming(client):
    messages = [{"role": "user", "content": "Speak."}]
    whole = client.chat.completions.create(model=CHAT, messages=messages, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=CHAT, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


def test_stop_sequences(client):
    kwargs = dict(model=BASE, prompt="To be or not", max_tokens=30, temperature=0)
    text = client.completions.create(**kwargs).choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    out = client.completions.create(**kwargs, stop=["@@@", stop])
    assert out.choices[0].text == text[: text.index(stop)] and out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(**kwargs, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text


def test_seed_determinism(client):
    kwargs = dict(model=BASE, prompt="Once upon a time", max_tokens=24, temperature=1.0, top_p=0.95)
    a = client.completions.create(**kwargs, seed=1234).choices[0].text
    assert client.completions.create(**kwargs, seed=1234).choices[0].text == a
    assert client.completions.create(**kwargs, seed=4321).choices[0].text != a
    top_k_1 = client.completions.create(**kwargs, seed=5, extra_body={"top_k": 1}).choices[0].text
    assert top_k_1 == client.completions.create(**{**kwargs, "temperature": 0}).choices[0].text
