"""The model against Hugging Face `LlamaForCausalLM` (the independent reference) and its own cache."""

import pytest
import torch
import transformers

import corral
from corral.config import ModelConfig
from corral.model import CacheView, KVCache, Layout, Transformer

MHA = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=320, multiple_of=16,  # FFN 176
                  norm_eps=1e-6, max_seq_len=64)
GQA = ModelConfig(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=320, multiple_of=32,  # FFN 256
                  rope_theta=500000.0, max_seq_len=64)
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32


def shape(c: ModelConfig):
    return (c.dim, c.n_layers, c.n_heads, c.kv_heads, c.vocab_size, c.ffn_dim, c.norm_eps, c.rope_theta)


def hf_model(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(
        hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
    )
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    # default init leaves norms at 1: perturb every parameter so a wrong mapping cannot hide
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("cfg", [MHA, GQA], ids=["mha", "gqa"])
def test_logits_match_hugging_face_loaded_from_its_directory(cfg, tmp_path):
    ref = hf_model(cfg)
    ref.save_pretrained(tmp_path)
    ours = corral.load_model(tmp_path)
    assert shape(ours.config) == shape(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), ref(tokens).logits, **TOL)


@pytest.mark.parametrize("cfg", [MHA, GQA], ids=["mha", "gqa"])
def test_export_hf_loads_in_transformers_with_the_same_logits(cfg, tmp_path):
    ours = Transformer(cfg).init_weights(seed=1)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    corral.save_model(ours, tmp_path / "corral")
    corral.export_hf(tmp_path / "corral", tmp_path / "hf")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ref(tokens).logits, ours(tokens), **TOL)


def test_kv_cache_decoding_equals_full_forward_for_a_ragged_batch():
    torch.manual_seed(0)
    model = Transformer(GQA).init_weights(seed=0).eval()
    lengths, total = [5, 9, 13], 24
    tokens = torch.randint(0, GQA.vocab_size, (3, total))
    with torch.no_grad():
        full = model(tokens)  # (3, total, vocab)
        cache = KVCache(GQA, n_slots=5)
        slots = torch.tensor([4, 0, 2])  # any rows of the pool
        # prefill: a right-padded batch of prompts of different lengths
        prompt = torch.stack([torch.cat([t[:n], t.new_zeros(max(lengths) - n)]) for t, n in zip(tokens, lengths)])
        logits = model(prompt, cache=CacheView(cache, slots, torch.zeros(3, dtype=torch.long)))
        for b, n in enumerate(lengths):
            torch.testing.assert_close(logits[b, :n], full[b, :n], **TOL)
        # decode: one token per row, every row at its own position
        pos = torch.tensor(lengths)
        while int(pos.max()) < total:
            step = tokens[torch.arange(3), pos.clamp(max=total - 1)][:, None]
            logits = model(step, Layout(logits_at="last"), CacheView(cache, slots, pos))
            for b in range(3):
                if pos[b] < total:
                    torch.testing.assert_close(logits[b, 0], full[b, pos[b]], **TOL)
            pos = pos + 1


def test_sequence_longer_than_context_is_rejected():
    model = Transformer(MHA)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, MHA.max_seq_len + 1, dtype=torch.long))


def test_branch_layout_gives_each_answer_the_prompt_and_its_own_positions():
    from corral.reward import branch_layout

    # a 3-token prompt, a 2-token answer, a 3-token answer, one padding token (continues answer 2)
    positions, mask = branch_layout(torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]]))
    assert positions.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 6]]
    sees = [[j for j in range(9) if mask[0, 0, i, j]] for i in range(9)]
    assert sees[2] == [0, 1, 2] and sees[4] == [0, 1, 2, 3, 4]
    assert sees[5] == [0, 1, 2, 5] and sees[7] == [0, 1, 2, 5, 6, 7]  # never the other answer
    model = Transformer(GQA).init_weights(seed=0)
    prompt, first, second = [5, 9, 13], [7, 8], [21, 22, 23]
    logits = model(torch.tensor([prompt + first + second]), Layout(*branch_layout(torch.tensor([[0] * 3 + [1] * 2 + [2] * 3]))))
    torch.testing.assert_close(logits[0, 3:5], model(torch.tensor([prompt + first]))[0, 3:], **TOL)
    torch.testing.assert_close(logits[0, 5:], model(torch.tensor([prompt + second]))[0, 3:], **TOL)
