"""Checkpoint formats: Meta's release layout (sharded too), HF configs of transformers 4.x and 5.x, errors."""

import json

import pytest
import torch
from safetensors.torch import save_file

import corral
from corral.checkpoint import CheckpointError, config_from_hf, detect_format, load_model, save_model
from corral.config import ModelConfig
from corral.model import Transformer

from .test_model import GQA, MHA, TOL, hf_model

# Meta's model.py (fairscale): column-parallel layers split output rows, row-parallel layers and the
# parallel embedding split input columns; norms are replicated on every shard.
COLUMN = ("wq", "wk", "wv", "w1", "w3", "output")
ROW = ("wo", "w2", "tok_embeddings")


def write_meta(state: dict, cfg: ModelConfig, out, n_shards: int):
    out.mkdir()
    params = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "multiple_of": cfg.multiple_of,
              "norm_eps": cfg.norm_eps, "vocab_size": -1}  # -1, as Llama 2's release writes it
    if cfg.n_kv_heads:
        params["n_kv_heads"] = cfg.n_kv_heads
    if cfg.rope_theta != 10000.0:
        params["rope_theta"] = cfg.rope_theta
    (out / "params.json").write_text(json.dumps(params))
    for r in range(n_shards):
        shard = {"rope.freqs": torch.zeros(cfg.head_dim // 2)}
        for name, t in state.items():
            kind = name.split(".")[-2]
            dim = 0 if kind in COLUMN else 1 if kind in ROW else None
            shard[name] = t.clone() if dim is None else t.chunk(n_shards, dim=dim)[r].clone()
        torch.save(shard, out / f"consolidated.{r:02d}.pth")


@pytest.mark.parametrize("n_shards", [1, 2])
@pytest.mark.parametrize("cfg", [MHA, GQA], ids=["mha", "gqa"])
def test_meta_layout_loads_with_the_logits_of_the_hf_model_it_came_from(cfg, n_shards, tmp_path):
    ref = hf_model(cfg, seed=3)
    ref.save_pretrained(tmp_path / "hf")
    # Meta weights = ours (un-permuted q/k); sized so MHA has hidden_dim from Meta's rule
    state = load_model(tmp_path / "hf").state_dict()
    write_meta(state, cfg, tmp_path / "meta", n_shards)
    assert detect_format(tmp_path / "meta") == "meta"
    model = load_model(tmp_path / "meta")
    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref(tokens).logits, **TOL)


def test_corral_round_trip_keeps_weights_and_config(tmp_path, tokenizer):
    model = Transformer(GQA).init_weights(seed=2)
    save_model(model, tmp_path / "c", tokenizer)
    again = load_model(tmp_path / "c")
    assert again.config == GQA
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    assert corral.load_tokenizer(tmp_path / "c").encode("abc") == tokenizer.encode("abc")


def test_save_is_atomic_and_a_failed_write_keeps_the_old_checkpoint(tmp_path):
    model = Transformer(MHA).init_weights(seed=0)
    save_model(model, tmp_path / "c")
    before = (tmp_path / "c" / "model.safetensors").read_bytes()

    class Boom(RuntimeError):
        pass

    broken = Transformer(MHA)
    broken.state_dict = lambda: (_ for _ in ()).throw(Boom())  # fails mid-save
    with pytest.raises(Boom):
        save_model(broken, tmp_path / "c")
    assert (tmp_path / "c" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temp dirs left behind


@pytest.mark.parametrize("style", ["4.x", "5.x"])
def test_hf_config_fields_that_change_the_numbers_are_read_in_both_styles(style):
    cfg = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 100, "intermediate_size": 128, "rms_norm_eps": 1e-5}
    if style == "4.x":
        cfg |= {"rope_theta": 1e6, "rope_scaling": None}
    else:
        cfg |= {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    mc = config_from_hf(cfg)
    assert (mc.rope_theta, mc.norm_eps, mc.kv_heads, mc.ffn_dim) == (1e6, 1e-5, 2, 128)


@pytest.mark.parametrize("extra, match", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "llama3"),
    ({"attention_bias": True}, "bias"),
    ({"model_type": "mistral"}, "mistral"),
    ({"hidden_act": "gelu"}, "gelu"),
])
def test_unsupported_hf_features_fail_clearly(extra, match):
    cfg = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "vocab_size": 100, "intermediate_size": 128} | extra
    with pytest.raises(CheckpointError, match=match):
        config_from_hf(cfg, "x/config.json")


def test_truncated_weights_name_the_file(tmp_path):
    save_model(Transformer(MHA).init_weights(seed=0), tmp_path / "c")
    f = tmp_path / "c" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path / "c")


def test_missing_tensor_and_shape_mismatch_name_the_tensor(tmp_path):
    save_model(Transformer(MHA).init_weights(seed=0), tmp_path / "c")
    f = tmp_path / "c" / "model.safetensors"
    state = load_model(tmp_path / "c").state_dict()
    save_file({k: v for k, v in state.items() if k != "layers.1.feed_forward.w3.weight"}, f)
    with pytest.raises(CheckpointError, match="layers.1.feed_forward.w3.weight"):
        load_model(tmp_path / "c")
    save_file(state | {"norm.weight": torch.ones(MHA.dim + 1)}, f)
    with pytest.raises(CheckpointError, match=r"norm.weight has shape \(65,\)"):
        load_model(tmp_path / "c")


def test_meta_shard_that_is_not_tensors_is_refused(tmp_path):
    write_meta(Transformer(MHA).state_dict(), MHA, tmp_path / "m", 1)
    torch.save({"tok_embeddings.weight": torch.zeros(1), "evil": object()}, tmp_path / "m" / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="consolidated.00.pth"):
        load_model(tmp_path / "m")


def test_unknown_directory_says_what_it_expected(tmp_path):
    with pytest.raises(CheckpointError, match="params.json"):
        detect_format(tmp_path)


@pytest.mark.parametrize("layout", ["corral-sharded", "hf", "meta-2-shards"])
def test_a_rank_reads_any_flat_range_of_any_tensor_without_the_rest(layout, tmp_path):
    """What a ZeRO-3 rank reads to fill its partition (`WeightReader.slice`): the same elements as
    the whole tensor, across row and head boundaries, from every layout (Hugging Face's permuted
    wq/wk rows and Meta's column-split shards included)."""
    from corral.checkpoint import WeightReader, write_checkpoint

    model = Transformer(GQA).init_weights(seed=4)
    state = model.state_dict()
    path = tmp_path / "ckpt"
    if layout == "corral-sharded":
        write_checkpoint(path, GQA, state.items(), shard_bytes=2**14)
    elif layout == "hf":
        hf_model(GQA, seed=4).save_pretrained(path)
        state = load_model(path).state_dict()
    else:
        write_meta(state, GQA, path, 2)
    reader = WeightReader(path)
    gen = torch.Generator().manual_seed(0)
    for name, whole in state.items():
        n = whole.numel()
        for start, end in [(0, n), (0, n // 3), (n // 3, n - 5), *(sorted(torch.randint(0, n + 1, (2,), generator=gen)
                                                                   .tolist()) for _ in range(3))]:
            got = reader.slice(name, whole.shape, start, end)
            assert torch.equal(got, whole.flatten()[start:end]), (name, start, end)


def test_the_rlhf_weight_sync_sends_a_block_at_a_time_what_an_export_stores(tmp_path):
    """vLLM engines get the policy's weights in memory (`corral.rlhf.generators.hf_layers`): the same
    names and layout (wq/wk permuted) as the Hugging Face checkpoint they started from."""
    from safetensors.torch import load_file

    from corral.rlhf.generators import hf_layers

    torch.manual_seed(0)
    model = Transformer(GQA)
    stored = load_file(save_model(model, tmp_path / "m") / "model.safetensors")
    chunks = list(hf_layers(model.state_dict().items(), GQA))
    assert len(chunks) == GQA.n_layers + 3  # embeddings, one per block, final norm, output
    assert all(len({name.split(".")[2] for name, _ in chunk}) == 1 for chunk in chunks[1:-2])  # one block each
    sent = dict(t for chunk in chunks for t in chunk)
    assert sent.keys() == stored.keys()
    assert all(torch.equal(sent[k], stored[k]) for k in stored)
