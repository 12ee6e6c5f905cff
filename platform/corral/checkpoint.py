"""Checkpoint formats: corral's own, Hugging Face Llama directories, and Meta's Llama 2 release.

corral's format is a directory holding `model.safetensors` (Meta's parameter names),
`corral.json` (the ModelConfig) and `tokenizer.model`. Every write goes to a temporary sibling
directory that is renamed into place, so a crash never leaves a half-written checkpoint.

Nothing is unpickled beyond tensors: safetensors, or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from corral.config import ModelConfig
from corral.model import Transformer
from corral.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer as _load_tokenizer_file

CORRAL_CONFIG = "corral.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: names the file and, where it applies, the tensor."""


# -- atomic directories ------------------------------------------------------------------------
@contextmanager
def atomic_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces `out_dir` only if the block finishes."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- corral format -----------------------------------------------------------------------------
def save_model(model: Transformer, out_dir: str | os.PathLike, tokenizer: Tokenizer | None = None,
               metadata: dict | None = None) -> Path:
    """Write `model` (and its tokenizer) as a corral checkpoint directory, atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_dir(out_dir) as tmp:
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        info = {"format": "corral", "model": model.config.model_dump(), **(metadata or {})}
        (tmp / CORRAL_CONFIG).write_text(json.dumps(info, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(out_dir)


def detect_format(path: str | os.PathLike) -> str:
    """'corral', 'hf' or 'meta' for a checkpoint directory; raises naming what is missing."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a directory; expected a corral, Hugging Face or Meta checkpoint")
    if (p / CORRAL_CONFIG).is_file():
        return "corral"
    if (p / "params.json").is_file() and list(p.glob("consolidated.*.pth")):
        return "meta"
    if (p / "config.json").is_file():
        return "hf"
    raise CheckpointError(
        f"{p} holds no checkpoint: expected {CORRAL_CONFIG} (corral), config.json + *.safetensors "
        f"(Hugging Face) or params.json + consolidated.*.pth (Meta)"
    )


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of any supported checkpoint directory, without loading weights."""
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "corral":
        return ModelConfig(**json.loads((p / CORRAL_CONFIG).read_text())["model"])
    if fmt == "hf":
        return config_from_hf(json.loads((p / "config.json").read_text()), p / "config.json")
    return _meta_config(p, _meta_shards(p)[0])


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Transformer:
    """Load a corral, Hugging Face Llama or Meta Llama 2 checkpoint directory as a Transformer."""
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "corral":
        config, state = read_config(p), _read_safetensors([p / WEIGHTS_FILE])
    elif fmt == "hf":
        config = read_config(p)
        state = hf_to_meta(_read_hf_weights(p), config)
    else:
        shards = _meta_shards(p)
        state = _merge_meta_shards(shards)
        config = _meta_config(p, shards[0], state)
    model = Transformer(config)
    _load_state(model, state, p)
    return model.to(dtype).eval()


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer beside a checkpoint (its directory, or the parent for Meta's layout), or a file."""
    p = Path(path)
    if p.is_dir() and not (p / TOKENIZER_FILE).is_file() and (p.parent / TOKENIZER_FILE).is_file():
        p = p.parent
    return _load_tokenizer_file(p)


def _load_state(model: Transformer, state: dict[str, torch.Tensor], source: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{source}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
    for name, ref in expected.items():
        if state[name].shape != ref.shape:
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(state[name].shape)}, "
                                  f"the config expects {tuple(ref.shape)}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]} ({len(unexpected)} in all)")
    model.load_state_dict(state)


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    state = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    state[name] = sf.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors file ({e}); it may be truncated") from e
    return state


# -- Hugging Face ------------------------------------------------------------------------------
HF_NAMES = {  # ours -> Hugging Face, {i} = layer
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}


def _rename(state: dict[str, torch.Tensor], n_layers: int, table: dict[str, str], source: str):
    out = {}
    for src_pattern, dst_pattern in table.items():
        for i in range(n_layers) if "{i}" in src_pattern else [None]:
            src, dst = src_pattern.format(i=i), dst_pattern.format(i=i)
            if src not in state:
                raise CheckpointError(f"{source}: tensor {src} is missing")
            out[dst] = state[src]
    return out


def permute_meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """wq/wk rows from Meta's interleaved-pair RoPE layout to Hugging Face's rotate-half layout."""
    dim1, dim2 = w.shape
    # (n_heads, head_dim/2, 2, dim2) -> (n_heads, 2, head_dim/2, dim2)
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def permute_hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of permute_meta_to_hf."""
    dim1, dim2 = w.shape
    # (n_heads, 2, head_dim/2, dim2) -> (n_heads, head_dim/2, 2, dim2)
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def _permute_qk(state: dict[str, torch.Tensor], config: ModelConfig, fn: Callable, names: tuple[str, str]):
    q_name, k_name = names
    for i in range(config.n_layers):
        state[q_name.format(i=i)] = fn(state[q_name.format(i=i)], config.n_heads)
        state[k_name.format(i=i)] = fn(state[k_name.format(i=i)], config.kv_heads)
    return state


def hf_to_meta(state: dict[str, torch.Tensor], config: ModelConfig, source: str = "checkpoint"):
    if "lm_head.weight" not in state and "model.embed_tokens.weight" in state:  # tie_word_embeddings
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    out = _rename(state, config.n_layers, {v: k for k, v in HF_NAMES.items()}, source)
    names = ("layers.{i}.attention.wq.weight", "layers.{i}.attention.wk.weight")
    return _permute_qk(out, config, permute_hf_to_meta, names)


def meta_to_hf(state: dict[str, torch.Tensor], config: ModelConfig):
    out = _rename(state, config.n_layers, HF_NAMES, "model")
    names = ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight")
    return _permute_qk(out, config, permute_meta_to_hf, names)


def config_from_hf(cfg: dict, source: Path | str = "config.json") -> ModelConfig:
    """ModelConfig from a Hugging Face Llama config.json, as transformers 4.x or 5.x writes it."""
    def fail(what: str):
        raise CheckpointError(f"{source}: {what} is not supported by corral's Llama 2 model")

    if cfg.get("model_type", "llama") != "llama":
        fail(f"model_type {cfg.get('model_type')!r}")
    if cfg.get("hidden_act", "silu") != "silu":
        fail(f"hidden_act {cfg['hidden_act']!r}")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        fail("a bias in attention or MLP projections")
    # transformers 5.x: rope_parameters {rope_type, rope_theta}; 4.x: top-level rope_theta + rope_scaling
    rope = cfg.get("rope_parameters") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    scaling = cfg.get("rope_scaling")
    if scaling:
        rope_type = scaling.get("rope_type") or scaling.get("type") or rope_type
    if rope_type != "default":
        fail(f"RoPE scaling type {rope_type!r}")
    try:
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        if cfg.get("head_dim") not in (None, hidden // heads):
            fail(f"head_dim {cfg['head_dim']} != hidden_size / num_attention_heads")
        return ModelConfig(
            dim=hidden,
            n_layers=cfg["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=cfg.get("num_key_value_heads") or heads,
            vocab_size=cfg["vocab_size"],
            hidden_dim=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            max_seq_len=cfg.get("max_position_embeddings", 4096),
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: required field {e.args[0]!r} is missing") from None


def hf_config(config: ModelConfig, tokenizer: Tokenizer | None) -> dict:
    """A config.json for LlamaForCausalLM that transformers 4.x and 5.x both read."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,  # 4.x
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},  # 5.x
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_id if tokenizer else 1,
        "eos_token_id": tokenizer.eos_id if tokenizer else 2,
        "pad_token_id": None,
        "torch_dtype": "float32",
    }


def _read_hf_weights(p: Path) -> dict[str, torch.Tensor]:
    files = sorted(p.glob("*.safetensors"))
    if files:
        return _read_safetensors(files)
    bins = sorted(p.glob("pytorch_model*.bin"))
    if not bins:
        raise CheckpointError(f"{p}: no *.safetensors (or pytorch_model*.bin) weights next to config.json")
    return {k: v for f in bins for k, v in _torch_load(f).items()}


def export_hf(src: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write any supported checkpoint as a Hugging Face Llama directory (weights, config, tokenizer).

    transformers' AutoModelForCausalLM and AutoTokenizer load it with no custom code.
    """
    model = load_model(src)
    try:
        tokenizer = load_tokenizer(src)
    except FileNotFoundError:
        tokenizer = None
    state = meta_to_hf({k: v.contiguous() for k, v in model.state_dict().items()}, model.config)
    state = {k: v.contiguous() for k, v in state.items()}
    with atomic_dir(out_dir) as tmp:
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(model.config, tokenizer), indent=2) + "\n")
        gen = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
            (tmp / "tokenizer.json").write_text(tokenizer.to_hf_json())
            (tmp / "tokenizer_config.json").write_text(json.dumps(HF_TOKENIZER_CONFIG, indent=2) + "\n")
            specials = {k: HF_TOKENIZER_CONFIG[k] for k in ("bos_token", "eos_token", "unk_token")}
            (tmp / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return Path(out_dir)


HF_TOKENIZER_CONFIG = {  # as meta-llama/Llama-2-7b-hf ships it, but the class (see Tokenizer.to_hf_json)
    "tokenizer_class": "PreTrainedTokenizerFast",
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": None,
    "clean_up_tokenization_spaces": False,
    "model_max_length": 4096,
}


# -- Meta --------------------------------------------------------------------------------------
# Model-parallel shards split column-parallel layers along dim 0 and row-parallel layers (and the
# parallel embedding) along dim 1; norms are replicated (fairscale layers in Meta's model.py).
_META_CONCAT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def _meta_shards(p: Path) -> list[Path]:
    shards = sorted(p.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"{p}: no consolidated.*.pth files next to params.json")
    return shards


def _torch_load(f: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises several types for truncated or non-tensor pickles
        raise CheckpointError(f"{f}: cannot read tensors ({e})") from e


def _merge_meta_shards(shards: list[Path]) -> dict[str, torch.Tensor]:
    parts = [_torch_load(f) for f in shards]
    merged = {}
    for name in parts[0]:
        if name == "rope.freqs":  # recomputed from rope_theta
            continue
        kind = name.split(".")[-2]
        pieces = [part[name] for part in parts]
        if len(parts) == 1 or kind not in _META_CONCAT_DIM:
            merged[name] = pieces[0]
        else:
            merged[name] = torch.cat(pieces, dim=_META_CONCAT_DIM[kind])
    return merged


def _meta_config(p: Path, shard0: Path, state: dict | None = None) -> ModelConfig:
    params = json.loads((p / "params.json").read_text())
    params = {k: v for k, v in params.items() if k != "use_scaled_rope" or v}
    if params.get("vocab_size", -1) <= 0:  # Llama 2's release writes -1: read it off the embedding
        state = state if state is not None else _torch_load(shard0)
        params["vocab_size"] = state["tok_embeddings.weight"].shape[0]
    try:
        return ModelConfig(**params)
    except Exception as e:
        raise CheckpointError(f"{p / 'params.json'}: {e}") from e

