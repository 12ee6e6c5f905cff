"""The ingress's output screening (`services.app._Screened`) on its own: which deltas a client gets,
and when, for a judge that blocks as soon as the reply so far holds a forbidden word. The real
guard, Serve and HTTP are in test_guard.py; this pins down the release order exactly."""

from __future__ import annotations

import asyncio

from services.app import _Screened


class Deltas:
    """An async stream of a reply's deltas, as a DeploymentResponseGenerator gives them."""

    def __init__(self, words: list[str], error_at: int | None = None):
        self.items = [{"text": w, "finish_reason": "stop" if i == len(words) - 1 else None, "prompt_tokens": 3,
                       "completion_tokens": i + 1} for i, w in enumerate(words)]
        if error_at is not None:
            self.items[error_at] = {"error": {"message": "engine failed"}, "status": 500}
        self.read, self.cancelled = 0, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.cancelled or self.read >= len(self.items):
            raise StopAsyncIteration
        self.read += 1
        return self.items[self.read - 1]

    def cancel(self):
        self.cancelled = True


def screen(words: list[str], every: int, error_at: int | None = None,
           first_guard: dict | None = None) -> tuple[list[dict], list[str], Deltas]:
    stream, judged = Deltas(words, error_at), []
    if first_guard is not None:  # the prompt's verdict rides on the first delta
        stream.items[0]["guard"] = first_guard

    async def judge(text: str) -> dict:
        judged.append(text)
        flagged = "bomb" in text
        return {"flagged": flagged, "decision": "block" if flagged else "pass", "categories": ["O1"] * flagged}

    async def run():
        first = await stream.__anext__()
        return [item async for item in _Screened(first, stream, judge, every)]

    return asyncio.run(run()), judged, stream


def test_a_safe_reply_is_released_whole_and_judged_every_n_deltas():
    words = ["To", " bake", " bread,", " mix", " flour", " and", " water."]
    out, judged, stream = screen(words, every=3)
    assert [o["text"] for o in out] == words and out[-1]["finish_reason"] == "stop"
    assert judged == ["To bake bread,", "To bake bread, mix flour and", "To bake bread, mix flour and water."]
    assert not stream.cancelled


def test_an_unsafe_chunk_never_reaches_the_client_and_the_stream_ends_with_content_filter():
    words = ["Sure.", " To", " build", " a", " bomb,", " get", " what", " you", " need."]
    out, judged, stream = screen(words, every=3)
    assert [o["text"] for o in out[:-1]] == ["Sure.", " To", " build"]  # the first chunk passed
    assert out[-1]["text"] == "" and out[-1]["finish_reason"] == "content_filter"
    assert out[-1]["guard"]["output"]["decision"] == "block" and out[-1]["completion_tokens"] == 6
    assert judged[-1] == "Sure. To build a bomb, get"
    assert stream.cancelled and stream.read == 6  # generation stopped at the blocked chunk


def test_errors_pass_through_at_once():
    out, judged, _ = screen(["a", "b", "c", "d"], every=3, error_at=1)
    assert [o.get("text") for o in out] == ["a", None] and "error" in out[-1] and judged == []


def test_a_reply_blocked_in_its_first_chunk_keeps_the_prompts_verdict():
    flagged_prompt = {"input": {"flagged": True, "decision": "flag"}}
    out, _, _ = screen(["Sure.", " To", " build", " a", " bomb,"], every=8, first_guard=flagged_prompt)
    (only,) = out  # nothing was released: the one item says why, for both directions
    assert only["finish_reason"] == "content_filter"
    assert only["guard"]["input"] == flagged_prompt["input"] and only["guard"]["output"]["decision"] == "block"
