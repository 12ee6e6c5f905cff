import pytest
from pydantic import ValidationError

from corral.config import PRESETS, ModelConfig


@pytest.mark.parametrize("name, expected", [
    ("llama2-7b", 6_738_415_616),
    ("llama2-13b", 13_015_864_320),
    ("llama2-70b", 68_976_648_192),
])
def test_released_checkpoint_parameter_counts(name, expected):
    assert ModelConfig.preset(name).num_params() == expected


@pytest.mark.parametrize("name, ffn", [("llama2-7b", 11008), ("llama2-13b", 13824),
                                       ("llama2-34b", 22016), ("llama2-70b", 28672)])
def test_paper_ffn_widths(name, ffn):
    cfg = ModelConfig.preset(name)
    assert cfg.ffn_dim == ffn and cfg.max_seq_len == 4096 and cfg.vocab_size == 32000


def test_paper_shapes():
    shapes = {n: (c.dim, c.n_layers, c.n_heads, c.kv_heads) for n in PRESETS if n.startswith("llama2")
              for c in [ModelConfig.preset(n)]}
    assert shapes == {"llama2-7b": (4096, 32, 32, 32), "llama2-13b": (5120, 40, 40, 40),
                      "llama2-34b": (8192, 48, 64, 8), "llama2-70b": (8192, 80, 64, 8)}


def test_cpu_presets_are_sized_for_a_laptop():
    assert 1e6 <= ModelConfig.preset("tiny").num_params() <= 5e6
    assert 20e6 <= ModelConfig.preset("small").num_params() <= 30e6


def test_num_params_matches_the_module():
    from corral.model import Transformer

    cfg = ModelConfig.preset("tiny")
    assert sum(p.numel() for p in Transformer(cfg).parameters()) == cfg.num_params()


@pytest.mark.parametrize("overrides, field", [
    (dict(dim=100, n_heads=3), "n_heads"),
    (dict(n_heads=6, n_kv_heads=4), "n_kv_heads"),
    (dict(dim=0), "dim"),
    (dict(n_layers=-1), "n_layers"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_inconsistent_configs_name_the_field(overrides, field):
    base = dict(dim=192, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=256)
    with pytest.raises(ValidationError, match=field):
        ModelConfig(**{**base, **overrides})


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="llama2-7b"):
        ModelConfig.preset("llama3")
