"""`compile_decode: true` in the Serve config, over HTTP with the official client: the replica's
engine process compiles its decode step at start, and serves the same greedy tokens as the eager
engine on the same weights (fp32), alone or beside other requests."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.services.conftest import add_application, remove_application

pytestmark = pytest.mark.slow

PROMPTS = ["The king said to the queen", "Now is the winter of our discontent", "To be or not", "O Romeo",
           "Friends, Romans", "All the world's a stage"]


@pytest.fixture(scope="module")
def compiled_app(serve_app):
    """The `corral` application's base model with compile_decode, as application `compiled`."""
    app = copy.deepcopy(serve_app.config["applications"][0])
    app.update(name="compiled", route_prefix="/compiled")
    app["args"] = {"base": app["args"]["base"] | {"compile_decode": True}}
    app["deployments"] = [d for d in app["deployments"] if d["name"] != "chat"]
    add_application(serve_app, app, timeout_s=600)
    yield openai.OpenAI(base_url=f"{serve_app.url}/compiled/v1", api_key="unused", max_retries=0, timeout=120)
    remove_application(serve_app, "compiled")


def complete(client: openai.OpenAI, prompt: str):
    return client.completions.create(model="corral-base", prompt=prompt, max_tokens=24, temperature=0, logprobs=1)


def test_compiled_replica_serves_the_eager_engines_tokens_alone_and_under_load(serve_app, compiled_app):
    eager = openai.OpenAI(base_url=serve_app.v1, api_key="unused", max_retries=0, timeout=120)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: complete(compiled_app, p).choices[0], PROMPTS))
    for prompt, mine in zip(PROMPTS, together):
        alone, theirs = complete(compiled_app, prompt).choices[0], complete(eager, prompt).choices[0]
        assert mine.logprobs.tokens == alone.logprobs.tokens == theirs.logprobs.tokens, prompt
        assert mine.text == theirs.text and mine.finish_reason == theirs.finish_reason
        assert mine.logprobs.token_logprobs == pytest.approx(theirs.logprobs.token_logprobs, abs=1e-4)
