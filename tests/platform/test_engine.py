"""The generation engine: sampling math, continuous batching against a no-cache reference, stops, cancel."""

import asyncio
import math

import pytest
import torch

from corral.config import ModelConfig
from corral.engine import Engine, SamplingParams, sample
from corral.model import CacheView, Layout, Transformer

TINY = ModelConfig.preset("tiny")


@pytest.fixture(scope="module")
def model():
    return Transformer(TINY).init_weights(seed=0).eval()


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full forwards, no cache: the independent reference."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (n,), generator=g).tolist()
    return [torch.randint(3, TINY.vocab_size, (length,), generator=g).tolist() for length in lengths]


# -- sampling -------------------------------------------------------------------------------------
def test_sample_filters_by_hand():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()[None].repeat(4, 1)
    t, p, k = torch.ones(4), torch.full((4,), 0.8), torch.zeros(4, dtype=torch.long)
    # top_p 0.8 keeps tokens 0 and 1 (mass 0.8); threshold u * 0.8 picks 0 below 0.5, else 1
    u = torch.tensor([0.0, 0.6, 0.7, 0.999])
    assert sample(logits, t, p, k, u).tolist() == [0, 0, 1, 1]
    # top_k 3 keeps mass 0.95: u * 0.95 >= 0.8 lands on token 2
    assert sample(logits, t, torch.ones(4), torch.full((4,), 3), u).tolist() == [0, 1, 1, 2]
    # temperature 0 is argmax whatever the draw; top_k 1 and a tiny top_p are too
    assert sample(logits, torch.zeros(4), torch.ones(4), k, u).tolist() == [0, 0, 0, 0]
    assert sample(logits, t, torch.ones(4), torch.ones(4, dtype=torch.long), u).tolist() == [0, 0, 0, 0]
    assert sample(logits, t, torch.full((4,), 1e-3), k, u).tolist() == [0, 0, 0, 0]


def test_sample_matches_the_tempered_distribution():
    torch.manual_seed(0)
    n, temperature = 20000, 0.7
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    draws = sample(logits[None].repeat(n, 1), torch.full((n,), temperature), torch.ones(n),
                   torch.zeros(n, dtype=torch.long), torch.rand(n))
    expected = torch.softmax(logits / temperature, -1)
    observed = torch.bincount(draws, minlength=5).float() / n
    torch.testing.assert_close(observed, expected, atol=0.015, rtol=0)


# -- the engine -------------------------------------------------------------------------------------
def test_greedy_matches_full_forward_reference(model):
    engine = Engine(model, max_batch_size=4)
    ps = prompts(3)
    params = SamplingParams(max_tokens=12, temperature=0)
    assert engine.generate(ps, params) == [reference_greedy(model, p, 12) for p in ps]


def test_continuous_batching_equals_each_request_alone(model):
    """More requests than slots, of different lengths: admitted as slots free up, same tokens."""
    ps = prompts(10, seed=1)
    params = [SamplingParams(max_tokens=4 + 3 * i, temperature=0) for i in range(len(ps))]
    alone = [Engine(model, max_batch_size=1).generate([p], sp)[0] for p, sp in zip(ps, params)]
    engine = Engine(model, max_batch_size=3)
    results: dict[int, list[int]] = {}
    ids = [engine.submit(p, sp, lambda out: results.setdefault(out.request_id, []).extend(out.token_ids))
           for p, sp in zip(ps, params)]
    engine.step()
    stats = engine.stats()
    assert stats["slots_used"] == 3 and stats["running"] == 3 and stats["waiting"] == 7  # full pool: requests wait
    while engine.stats()["running"] or engine.stats()["waiting"]:
        engine.step()
    assert [results[i] for i in ids] == alone
    assert [len(r) for r in alone] == [sp.max_tokens for sp in params]
    assert engine.stats()["slots_used"] == 0


def test_decode_rows_are_bitwise_independent_of_the_batch(model):
    """What makes greedy serving under load give the tokens of each request alone."""
    ps = prompts(12, seed=3)
    params = SamplingParams(max_tokens=20, temperature=0)
    alone = [Engine(model, max_batch_size=1).generate([p], params)[0] for p in ps]
    together = Engine(model, max_batch_size=12).generate(ps, params)
    assert together == alone
    # and the logits themselves: one row decoded in a batch of 12 and alone, bit for bit
    engine = Engine(model, max_batch_size=12)
    engine.generate(ps, SamplingParams(max_tokens=3, temperature=0))
    slots, positions = torch.arange(12), torch.tensor([len(p) + 2 for p in ps])
    tokens = torch.tensor([[5]] * 12)
    pad = lambda t, v: torch.cat([t, torch.full((16 - len(t),) + t.shape[1:], v)])  # noqa: E731
    with torch.no_grad():
        last = Layout(logits_at="last")
        batch = model(pad(tokens, 0), last, CacheView(engine.cache, pad(slots, 12), pad(positions, 0), exact_rows=16))
        one = model(pad(tokens[7:8], 0), last, CacheView(engine.cache, pad(slots[7:8], 12), pad(positions[7:8], 0),
                                                         exact_rows=16))
    assert torch.equal(batch[7], one[0])


def test_bf16_rows_are_independent_of_the_batch_with_packed_weights(model):
    """bf16 on a CPU: oneDNN-packed weights (`pack_linears`) and one padding row keep greedy
    serving under load equal to each request alone; the packed layers compute what nn.Linear does."""
    import copy

    from corral.engine import PackedLinear, pack_linears

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    x = torch.randn(5, 3, TINY.dim).to(torch.bfloat16)
    expected = bf16.layers[0].attention.wq(x)
    packed = pack_linears(bf16)
    if not isinstance(packed.output, PackedLinear):
        pytest.skip("no oneDNN or no bf16 instructions on this CPU: nothing is packed, decode pads to 16 rows")
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    torch.testing.assert_close(packed.layers[0].attention.wq(x), expected, rtol=1e-2, atol=1e-2)
    ps = prompts(12, seed=3)
    params = SamplingParams(max_tokens=20, temperature=0)
    alone = [Engine(packed, max_batch_size=1).generate([p], params)[0] for p in ps]
    engine = Engine(packed, max_batch_size=12)
    assert engine.min_decode_rows == 2 and engine.cache.k.dtype == torch.float32  # attention in fp32 on a CPU
    assert engine.generate(ps, params) == alone


def test_seed_makes_sampling_reproducible(model):
    engine = Engine(model, max_batch_size=8)
    p = prompts(1)[0]
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    first = engine.generate([p, p, p], params)
    assert engine.generate([p, p, p], params) == first
    assert len({tuple(x) for x in first}) == 3  # prompt i samples with seed + i
    assert engine.generate([p], params.model_copy(update={"seed": 8}))[0] != first[0]


def test_stop_token_and_length_finish(model):
    engine = Engine(model, max_batch_size=2)
    p = prompts(1)[0]
    greedy = engine.generate([p], SamplingParams(max_tokens=10, temperature=0))[0]
    stop = greedy[4]
    stopped = engine.generate([p], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop]))[0]
    assert stopped == greedy[: greedy.index(stop) + 1]


def test_stop_strings_end_the_text_and_stream_deltas_add_up(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=2)
    prompt = tokenizer.encode("The king said")
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)

    async def run(sp):
        outs = [out async for out in engine.stream(prompt, sp)]
        return "".join(o.text for o in outs), outs[-1]

    text, last = asyncio.run(run(params))
    assert last.finish_reason == "length" and last.completion_tokens == 24
    anchor = tokenizer.decode(prompt[-1:])  # the completion's text keeps its leading space
    assert text == tokenizer.decode(prompt[-1:] + engine.generate([prompt], params)[0])[len(anchor):]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut, last = asyncio.run(run(params.model_copy(update={"stop": ["zzzq", stop]})))
    assert cut == text[: text.index(stop)] and last.finish_reason == "stop"
    engine.close()


def test_cancel_frees_the_slot_at_once(model):
    engine = Engine(model, max_batch_size=2)

    async def run():
        stream = engine.stream(prompts(1)[0], SamplingParams(max_tokens=200, temperature=0))
        await anext(stream)
        assert engine.stats()["slots_used"] == 1
        await stream.aclose()  # what a disconnected client's cancelled task does
        return engine.stats()

    stats = asyncio.run(run())
    assert stats["slots_used"] == 0 and stats["running"] == 0 and stats["cancelled_total"] == 1
    engine.close()


def test_prompt_that_does_not_fit_is_rejected(model):
    engine = Engine(model, max_batch_size=1)
    with pytest.raises(ValueError, match="exceeds the context of 256 tokens"):
        engine.submit([5] * 250, SamplingParams(max_tokens=10), print)
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], SamplingParams(), print)
    with pytest.raises(ValueError, match="token ids"):
        engine.submit([TINY.vocab_size], SamplingParams(), print)
    # (k, v) x layers x (1 slot + 1 scratch) x seq x kv_heads x head_dim x fp32
    assert math.isclose(engine.cache.nbytes(), 2 * 4 * 2 * 256 * 2 * 32 * 4)


# -- log-probabilities ----------------------------------------------------------------------------------
def test_logprobs_are_the_models_own_log_softmax(model):
    """Sampled tokens' and prompt tokens' log-probabilities, and the top-N, against a full forward."""
    prompt = prompts(1, seed=7)[0][:20]
    engine = Engine(model, max_batch_size=4)
    outputs = []
    engine.submit(prompt, SamplingParams(max_tokens=6, temperature=0.8, seed=3, logprobs=3, prompt_logprobs=2),
                  outputs.append)
    while not (outputs and outputs[-1].finished):
        engine.step()
    generated = [t for o in outputs for t in o.token_ids]
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([prompt + generated]))[0].float(), dim=-1)  # (L, vocab)
    sequence = prompt + generated
    prompt_lps = outputs[0].prompt_logprobs
    assert prompt_lps[0] is None and len(prompt_lps) == len(prompt)
    sampled = [lp for o in outputs for lp in o.logprobs]
    assert [lp.token_id for lp in sampled] == generated
    for t, lp in enumerate(prompt_lps[1:] + sampled, start=1):  # token t is predicted at position t - 1
        assert lp.token_id == sequence[t]
        assert lp.logprob == pytest.approx(reference[t - 1, sequence[t]].item(), abs=1e-5)
        top = reference[t - 1].topk(len(lp.top))
        assert [i for i, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert {len(lp.top) for lp in sampled} == {3} and {len(lp.top) for lp in prompt_lps[1:]} == {2}


# -- faults -----------------------------------------------------------------------------------------------
class Poisoned(torch.nn.Module):
    """The model, except that a forward over a poisoned token id raises (as an out-of-memory would)."""

    def __init__(self, model, poison: int):
        super().__init__()
        self.model, self.poison, self.config = model, poison, model.config
        self.broken = False  # when True every forward raises: an engine that cannot continue

    def forward(self, tokens, layout=None, cache=None):
        if self.broken or bool((tokens == self.poison).any()):
            raise RuntimeError("forward failed")
        return self.model(tokens, layout, cache)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16: the prompts are prefilled in one forward
def test_a_failing_forward_fails_only_its_requests(model, dtype):
    import copy

    from corral.engine import pack_linears

    poison = 4000
    if dtype == "bfloat16":
        model = pack_linears(copy.deepcopy(model).to(torch.bfloat16))
    engine = Engine(Poisoned(model, poison), max_batch_size=8)
    good = prompts(3, seed=11)
    params = SamplingParams(max_tokens=8, temperature=0)
    alone = Engine(model, max_batch_size=8).generate(good, params)

    async def run():
        async def one(prompt):
            try:
                return [t async for out in engine.stream(prompt, params) for t in out.token_ids]
            except Exception as e:
                return e
        return await asyncio.gather(*(one(p) for p in [good[0], [5, 6, poison], good[1], good[2]]))

    results = asyncio.run(run())
    assert isinstance(results[1], RuntimeError) and "forward failed" in str(results[1])
    assert [results[0], results[2], results[3]] == alone  # the others are untouched
    assert engine.health() is None
    assert engine.generate([good[0]], params) == [alone[0]]  # and the engine serves on
    engine.close()


def test_an_engine_that_cannot_continue_stops_and_says_why(model):
    from corral.engine import EngineError

    broken = Poisoned(model, poison=-1)
    engine = Engine(broken, max_batch_size=4)
    broken.broken = True
    with pytest.raises(EngineError):
        engine.generate(prompts(4, seed=2), SamplingParams(max_tokens=4))
    assert "forwards in a row failed" in engine.health()
    with pytest.raises(EngineError, match="the engine stopped"):
        engine.submit([5, 6], SamplingParams(), lambda out: None)
