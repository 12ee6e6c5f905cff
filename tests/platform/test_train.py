"""The training pieces on their own: schedule, AdamW groups, loss math, and the DeepSpeed strategy's
checkpoint round trip (one process, ZeRO-3, bf16) continuing bit-for-bit."""

from __future__ import annotations

import math

import pytest
import torch

from corral.config import DeepSpeedConfig, ModelConfig, OptimConfig
from corral.model import Transformer
from corral.train.losses import causal_lm_loss, pretrain_loss
from corral.train.schedule import lr_factor
from corral.train.strategy import cpu_flags, param_groups, slow_bf16_warning


def test_warmup_then_cosine_to_ten_percent():
    f = lambda s: lr_factor(s, warmup_steps=10, max_steps=110, min_ratio=0.1)  # noqa: E731
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # linear warmup
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)  # half-way down the cosine: 0.1 + 0.9 * 0.5
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)  # the floor
    assert all(f(s) >= f(s + 1) for s in range(10, 110))


def test_weight_decay_on_matrices_not_norm_gains():
    model = Transformer(ModelConfig.preset("tiny"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if "norm" in n}
    assert "tok_embeddings.weight" in {names[id(p)] for p in decay["params"]}
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.config.num_params()


def test_bf16_on_a_cpu_without_bf16_instructions_warns():
    avx2 = {"fpu", "avx", "avx2", "fma"}
    warning = slow_bf16_warning(True, False, avx2)
    assert "avx512_bf16" in warning and "bf16: false" in warning
    assert slow_bf16_warning(True, False, avx2 | {"avx512f", "avx512_bf16"}) is None
    assert slow_bf16_warning(True, False, avx2 | {"amx_bf16"}) is None
    assert slow_bf16_warning(False, False, avx2) is None  # fp32
    assert slow_bf16_warning(True, True, avx2) is None  # a GPU does the matmuls
    assert slow_bf16_warning(True, False, set()) is None  # flags unknown: no guess
    assert "fpu" in cpu_flags()  # read off this Linux machine


def test_causal_lm_loss_by_hand():
    vocab = 8
    uniform = torch.zeros(2, 3, vocab)
    assert causal_lm_loss(uniform, torch.tensor([[1, 2, 3], [4, 5, 6]])).item() == pytest.approx(math.log(vocab))
    logits = torch.tensor([[[math.log(3.0), 0.0]]])  # p(target 0) = 3/4
    assert causal_lm_loss(logits, torch.tensor([[0]])).item() == pytest.approx(-math.log(0.75))
    masked = torch.tensor([[0, -100]])  # ignored targets do not count
    two = torch.tensor([[[math.log(3.0), 0.0], [9.0, -9.0]]])
    assert causal_lm_loss(two, masked).item() == pytest.approx(-math.log(0.75))


def test_pretrain_loss_shifts_targets_by_one():
    class Echo(torch.nn.Module):  # predicts the input token itself with certainty
        def forward(self, tokens):
            return torch.nn.functional.one_hot(tokens, 16).float() * 100

    tokens = torch.tensor([[3, 3, 3, 3, 3]])
    loss, n = pretrain_loss(Echo(), {"tokens": tokens})
    assert n == 4 and loss.item() == pytest.approx(0.0, abs=1e-6)  # next token == this token
    loss, _ = pretrain_loss(Echo(), {"tokens": torch.tensor([[3, 4, 5, 6, 7]])})
    assert loss.item() > 10


def free_master_port(monkeypatch) -> None:
    import socket

    with socket.socket() as sock:  # a free port for this process's gloo group
        sock.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(sock.getsockname()[1]))


def test_strategy_reports_the_gradient_norm_before_clipping_in_fp32(monkeypatch):
    """ZeRO-0 fp32: DeepSpeed clips without keeping the norm; the strategy measures it."""
    from corral.train.strategy import DeepSpeedStrategy

    free_master_port(monkeypatch)
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=256, multiple_of=32, max_seq_len=32)
    batch = {"tokens": torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(0))}
    reference = Transformer(config).init_weights(seed=0)
    pretrain_loss(reference, batch)[0].backward()
    expected = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in reference.parameters())).item()
    s = DeepSpeedStrategy(DeepSpeedConfig(zero_stage=0, bf16=False), OptimConfig(lr=1e-3, warmup_steps=1),
                          micro_batch_size=4, max_steps=10)
    model = s.prepare(Transformer(config).init_weights(seed=0))
    s.backward(pretrain_loss(model, batch)[0])
    s.step()
    assert expected > 1.0  # clipped at 1.0: the reported norm is the one before clipping
    assert s.grad_norm() == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_strategy_checkpoint_resumes_exactly(tmp_path, monkeypatch):
    """ZeRO-3 + bf16 in one process: save after 3 steps, load into a fresh engine, same next losses."""
    from corral.train.strategy import DeepSpeedStrategy

    free_master_port(monkeypatch)
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=256, multiple_of=32, max_seq_len=32)
    gen = torch.Generator().manual_seed(0)
    batches = [{"tokens": torch.randint(0, 16, (4, 17), generator=gen)} for _ in range(5)]  # learnable: 16 of 256 ids

    def strategy():
        s = DeepSpeedStrategy(DeepSpeedConfig(zero_stage=3, bf16=True), OptimConfig(lr=1e-2, warmup_steps=2),
                              micro_batch_size=4, max_steps=10)
        return s, s.prepare(Transformer(config).init_weights(seed=0))

    def train(s, model, batch):
        loss, _ = pretrain_loss(model, batch)
        s.backward(loss)
        s.step()
        return loss.item()

    s, model = strategy()
    first = [train(s, model, b) for b in batches[:3]]
    s.save(tmp_path, {"step": 3})
    expected = [train(s, model, b) for b in batches[3:]]
    assert first[-1] < first[0]

    s2, model2 = strategy()
    assert s2.load(tmp_path)["step"] == 3
    assert [train(s2, model2, b) for b in batches[3:]] == expected  # bit-for-bit
    state = s2.full_state_dict()
    assert state["output.weight"].dtype == torch.float32 and state["output.weight"].shape == (256, 64)
