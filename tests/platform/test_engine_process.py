"""The engine in its own process: the same tokens as in-process, cancels and bad requests crossing
the pipe, and a child that dies or cannot load reported, not hung on."""

import asyncio
import os
import signal
import time

import pytest
import torch

import corral
from corral.config import ModelConfig
from corral.engine import Engine, EngineError, SamplingParams, decode_continuation, pack_linears
from corral.engine_process import EngineProcess
from corral.model import Transformer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("engine-process") / "tiny"
    corral.save_model(Transformer(ModelConfig.preset("tiny")).init_weights(seed=0), path, tokenizer)
    return path


@pytest.fixture(scope="module")
def engine(checkpoint):
    engine = EngineProcess(str(checkpoint), max_batch_size=4)
    yield engine
    engine.close()


async def collect(engine, prompt, params) -> tuple[list[int], str]:
    tokens, text = [], ""
    async for out in engine.stream(prompt, params):
        tokens += out.token_ids
        text += out.text
    return tokens, text


def test_streams_give_the_in_process_engines_tokens_and_text(engine, checkpoint, tokenizer):
    prompts = [tokenizer.encode(t) for t in ("The king", "Enter the queen and", "What say you", "O", "My lord,",
                                             "Good night")]
    params = [SamplingParams(max_tokens=6 + 2 * i, temperature=0, ignore_eos=True) for i in range(len(prompts))]

    async def run():
        return await asyncio.gather(*(collect(engine, p, sp) for p, sp in zip(prompts, params)))

    results = asyncio.run(run())  # six requests on four slots: two wait for a slot
    local = Engine(corral.load_model(checkpoint), tokenizer, max_batch_size=4)
    for (tokens, text), prompt, sp in zip(results, prompts, params):
        assert tokens == local.generate([prompt], sp)[0]
        assert text == decode_continuation(tokenizer, prompt, tokens)  # the deltas add up to the completion
    assert engine.max_seq_len == local.max_seq_len
    assert engine.stats()["slots_used"] == 0 and engine.health() is None


def test_a_request_left_early_frees_its_slot_and_a_bad_one_fails_alone(engine):
    async def leave_early():
        async for out in engine.stream([5, 6, 7], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)):
            if out.completion_tokens >= 2:
                return out.completion_tokens

    assert asyncio.run(leave_early()) >= 2
    deadline = time.time() + 30
    while engine.stats()["slots_used"]:  # the cancel crosses the pipe; the next step frees the slot
        assert time.time() < deadline, "the cancelled request kept its slot"
        asyncio.run(collect(engine, [5], SamplingParams(max_tokens=1)))
    with pytest.raises(EngineError, match=r"token ids must lie in \[0, 4096\)"):
        asyncio.run(collect(engine, [5, 999999], SamplingParams(max_tokens=2)))
    assert asyncio.run(collect(engine, [5, 6], SamplingParams(max_tokens=3, temperature=0)))[0]


def test_a_child_that_dies_fails_its_requests_and_turns_health_red(checkpoint):
    engine = EngineProcess(str(checkpoint), max_batch_size=2)

    async def kill_midway():
        async for out in engine.stream([5, 6], SamplingParams(max_tokens=200, ignore_eos=True)):
            if out.completion_tokens >= 1:
                os.kill(engine._process.pid, signal.SIGKILL)

    with pytest.raises(EngineError, match="the engine process exited"):
        asyncio.run(kill_midway())
    assert "exit code -9" in engine.health()
    with pytest.raises(EngineError, match="the engine stopped"):
        asyncio.run(collect(engine, [5], SamplingParams(max_tokens=1)))


def test_a_checkpoint_the_child_cannot_load_is_an_error_naming_it(tmp_path):
    with pytest.raises(EngineError, match="could not load .*not-there"):
        EngineProcess(str(tmp_path / "not-there"))


def test_bf16_on_a_cpu_is_packed_in_the_child(checkpoint):
    engine = EngineProcess(str(checkpoint), dtype="bfloat16", max_batch_size=2)
    try:
        tokens, _ = asyncio.run(collect(engine, [5, 6, 7], SamplingParams(max_tokens=8, temperature=0)))
    finally:
        engine.close()
    local = Engine(pack_linears(corral.load_model(checkpoint, torch.bfloat16)), max_batch_size=2)
    assert tokens == local.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0))[0]
