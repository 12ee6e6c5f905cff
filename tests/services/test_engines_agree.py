"""The two engines on the same weights (fp32): vLLM's greedy completions equal corral's, token for
token, with the same log-probabilities."""

from __future__ import annotations

import openai
import pytest

pytestmark = pytest.mark.slow

PROMPTS = ["The king said to the queen", "Now is the winter of our discontent", "To be or not", "O Romeo"]


def clients(serve_app, vllm_app) -> list[openai.OpenAI]:
    return [openai.OpenAI(base_url=app.v1, api_key="unused", max_retries=0, timeout=120) for app in (serve_app, vllm_app)]


def test_greedy_completions_are_the_same_tokens_text_and_logprobs(serve_app, vllm_app):
    corral_client, vllm_client = clients(serve_app, vllm_app)
    for prompt in PROMPTS:
        kwargs = dict(model="corral-base", prompt=prompt, max_tokens=32, temperature=0, logprobs=2)
        mine, theirs = (c.completions.create(**kwargs).choices[0] for c in (corral_client, vllm_client))
        assert theirs.logprobs.tokens == mine.logprobs.tokens, prompt
        assert theirs.text == mine.text and theirs.finish_reason == mine.finish_reason
        assert theirs.logprobs.token_logprobs == pytest.approx(mine.logprobs.token_logprobs, abs=1e-4)


def test_greedy_chat_replies_are_the_same(serve_app, vllm_app):
    corral_client, vllm_client = clients(serve_app, vllm_app)
    for content in PROMPTS[:2]:
        kwargs = dict(model="corral-chat", messages=[{"role": "user", "content": content}], max_tokens=24,
                      temperature=0)
        mine, theirs = (c.chat.completions.create(**kwargs) for c in (corral_client, vllm_client))
        assert theirs.choices[0].message.content == mine.choices[0].message.content
        assert theirs.usage == mine.usage
