"""The compiled decode step (TorchInductor on a CPU): the model's logits, token by token, and each
row's tokens independent of the batch, in fp32 and bf16. Each engine here compiles for real
(about 30 s for the tiny preset on 2 cores; inductor's disk cache makes repeats faster)."""

import copy

import pytest
import torch

from corral.compiled_decode import ROWS, CompiledDecode
from corral.config import ModelConfig
from corral.engine import Engine, SamplingParams
from corral.model import KVCache, Transformer

TINY = ModelConfig.preset("tiny")  # grouped-query attention: 6 heads over 2 key/value heads

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    return Transformer(TINY).init_weights(seed=0).eval()


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, TINY.vocab_size, (int(length),), generator=g).tolist()
            for length in torch.randint(1, 30, (n,), generator=g)]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_token_by_token_logits_are_the_models_full_forward(model, dtype, tolerance):
    """Two sequences fed one token a step from an empty cache (positions 0..n-1, each in its own
    slot) give at every step the logits of the plain causal forward over the whole sequence."""
    model = copy.deepcopy(model).to(dtype)
    cache = KVCache(TINY, 3, 64)
    decode = CompiledDecode(model, cache, scratch_slot=2)
    sequences = torch.randint(3, TINY.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    steps = torch.stack([decode(sequences[:, t].tolist(), [0, 1], [t, t]) for t in range(sequences.shape[1])], 1)
    with torch.no_grad():
        expected = model(sequences)  # (2, 24, vocab), fp32
    torch.testing.assert_close(steps, expected, atol=tolerance, rtol=0)
    assert steps.dtype == torch.float32


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_requests_tokens_do_not_depend_on_the_batch(model, dtype):
    """Nine requests at once (two chunks of ROWS rows and one of 1) give each one the tokens it
    gets alone, with no padding rows; in fp32 those are also the eager engine's tokens."""
    model = copy.deepcopy(model).to(getattr(torch, dtype))
    engine = Engine(model, max_batch_size=10, compile_decode=True)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    batch = prompts(2 * ROWS + 1)
    together = engine.generate(batch, params)
    assert together == [engine.generate([p], params)[0] for p in batch]
    if dtype == "float32":
        assert together == Engine(model, max_batch_size=10).generate(batch, params)


def test_sampled_requests_keep_their_seeds(model):
    """Sampling reads the compiled logits as it reads the eager ones: a seeded request gives the
    same tokens alone and beside others."""
    engine = Engine(model, max_batch_size=4, compile_decode=True)
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    alone = engine.generate([[5, 6, 7]], seeded)
    assert engine.generate([[5, 6, 7], [9, 10, 11, 12]], seeded)[0] == alone[0]


def test_a_model_off_the_cpu_is_refused_with_what_to_do():
    model = Transformer(TINY).to("meta")
    with pytest.raises(ValueError, match="for CPUs.*engine: vllm"):
        CompiledDecode(model, KVCache(TINY, 2, 16, device="meta"), scratch_slot=1)


def test_kernels_that_change_a_rows_bits_with_the_batch_are_refused():
    """What construction does on a CPU where inductor's kernels would not compute rows alone."""
    decode = object.__new__(CompiledDecode)
    decode.cache, decode.scratch_slot = KVCache(TINY, 2, 16), 1
    decode.rows = [torch.tensor(n) for n in range(ROWS + 1)]
    decode.step = lambda tokens, *args: torch.ones(len(tokens), 8) * (1 + 1e-6 * len(tokens))  # depends on the batch
    with pytest.raises(ValueError, match="different bits at different batch sizes.*compile_decode: false"):
        decode._check_rows_alone()
    decode.step = lambda tokens, *args: torch.ones(len(tokens), 8)
    decode._check_rows_alone()
