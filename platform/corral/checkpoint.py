"""Checkpoint formats: corral's own, Hugging Face Llama directories, and Meta's Llama 2 release.

corral's format is Hugging Face's layout plus `corral.json` (the ModelConfig and lineage): sharded
safetensors with an index, `config.json` and the tokenizer files, so `transformers` and vLLM read
a corral checkpoint as it is. In memory corral keeps Meta's names (`corral.model`); names and the
wq/wk row order are converted tensor by tensor on the way in and out. corral's first format
(`model.safetensors` under Meta's names) still loads. Every write goes to a temporary sibling
directory that is renamed into place, so a crash never leaves a half-written checkpoint.

Nothing is unpickled beyond tensors: safetensors, or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from corral.config import ModelConfig
from corral.model import Transformer, fill_parameters
from corral.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer as _load_tokenizer_file

CORRAL_CONFIG = "corral.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_BYTES = 5 * 2**30  # Hugging Face's default shard size for safetensors


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


# -- writing --------------------------------------------------------------------------------------
def write_checkpoint(out_dir: str | os.PathLike, config: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], *,
                     head: str = "lm", tokenizer: Tokenizer | None = None, metadata: dict | None = None,
                     dtype: torch.dtype | None = None, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write a model, given tensor by tensor under corral's names, as a checkpoint directory.

    The layout is Hugging Face's (`LlamaForCausalLM`, or `LlamaForSequenceClassification` with one
    label for a reward head): safetensors shards of at most `shard_bytes` and
    `model.safetensors.index.json` (one `model.safetensors` when it fits), `config.json` and the
    tokenizer files, so `transformers`, vLLM and `corral.load_model` read the same directory.
    `corral.json` adds corral's config and lineage. Only one shard is ever held in memory: a
    trainer streams its layers in as it gathers them. Written atomically (see `atomic_dir`).
    """
    metadata = {"head": head, **(metadata or {})}
    with atomic_dir(out_dir) as tmp:
        shards: list[dict[str, torch.Tensor]] = []
        shard, size, total = {}, 0, 0
        for name, tensor in tensors:
            name, tensor = to_hf(name, tensor, config, head)
            tensor = tensor.to(dtype or tensor.dtype).contiguous()
            if shard and size + tensor.nbytes > shard_bytes:
                save_file(shard, tmp / f"part-{len(shards)}", metadata={"format": "pt"})
                shards.append(list(shard))
                shard, size = {}, 0
            shard[name] = tensor
            size, total = size + tensor.nbytes, total + tensor.nbytes
        save_file(shard, tmp / f"part-{len(shards)}", metadata={"format": "pt"})
        shards.append(list(shard))
        if len(shards) == 1:
            os.replace(tmp / "part-0", tmp / WEIGHTS_FILE)
        else:
            weight_map = {}
            for k, names in enumerate(shards):
                file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                os.replace(tmp / f"part-{k}", tmp / file)
                weight_map |= dict.fromkeys(names, file)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        written = dtype or next(iter(shard.values())).dtype
        info = {"format": "corral", "version": 2, "model": config.model_dump(), **metadata}
        (tmp / CORRAL_CONFIG).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(hf_config(config, tokenizer, head, written), indent=2) + "\n")
        gen = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
            (tmp / "tokenizer.json").write_text(tokenizer.to_hf_json())
            (tmp / "tokenizer_config.json").write_text(json.dumps(HF_TOKENIZER_CONFIG, indent=2) + "\n")
            specials = {k: HF_TOKENIZER_CONFIG[k] for k in ("bos_token", "eos_token", "unk_token")}
            (tmp / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return Path(out_dir)


def save_model(model: Transformer, out_dir: str | os.PathLike, tokenizer: Tokenizer | None = None,
               metadata: dict | None = None, head: str = "lm") -> Path:
    """Write an in-memory `model` (and its tokenizer) as a checkpoint directory (`write_checkpoint`)."""
    return write_checkpoint(out_dir, model.config, model.state_dict().items(), head=head, tokenizer=tokenizer,
                            metadata=metadata)


def export_hf(src: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Any supported checkpoint (Meta's release, an older corral one) as a Hugging Face Llama
    directory, tensor by tensor; `transformers` and vLLM load it with no custom code."""
    weights = WeightReader(src)
    try:
        tokenizer = load_tokenizer(src)
    except FileNotFoundError:
        tokenizer = None
    return write_checkpoint(out_dir, weights.config, ((n, weights.read(n)) for n in weights.names),
                            head=weights.head, tokenizer=tokenizer, metadata=weights.metadata)


# -- reading, one tensor at a time ---------------------------------------------------------------
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


class WeightReader:
    """A checkpoint's tensors under corral's names, read one at a time: `reader(name, shape)`, or
    only a flat range of one: `reader.slice(name, shape, start, end)`.

    Any layout loads: corral's, Hugging Face's (safetensors, sharded or not, or `.bin`) and Meta's
    release (`consolidated.*.pth`, model-parallel shards joined per tensor). Files are memory-
    mapped and only the rows asked for are copied out, so a ZeRO-3 rank filling its partition of
    a 70B model reads its share of each tensor and never holds a whole one (`DeepSpeedStrategy.build`).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = p = Path(path)
        self.format = detect_format(p)
        self.config = read_config(p)
        info = json.loads((p / CORRAL_CONFIG).read_text()) if self.format == "corral" else {}
        self.head = info.get("head", "lm")
        self.metadata = {k: v for k, v in info.items() if k not in ("format", "version", "model", "head")}
        self._meta_parts: list[dict[str, torch.Tensor]] = []
        self._files: dict[str, Path] = {}
        self._hf_names = False
        self._tied = False  # Hugging Face's tie_word_embeddings: the output layer is the embedding
        if self.format == "meta":
            self._meta_parts = [_torch_load(f) for f in _meta_shards(p)]  # memory-mapped
            stored = [k for k in self._meta_parts[0] if k != "rope.freqs"]  # recomputed from rope_theta
        else:
            self._files = _tensor_files(p)
            self._hf_names = "tok_embeddings.weight" not in self._files  # corral's first format kept Meta's names
            self._tied = self._hf_names and self.head == "lm" and "lm_head.weight" not in self._files
            stored = list(self._files) + (["lm_head.weight"] if self._tied else [])
        self.names = sorted({meta_name(n, self.head) if self._hf_names else n for n in stored} - {None})

    def check(self, names: Iterable[str]) -> None:
        """Raise naming the first tensor that the model needs and the checkpoint lacks, or the reverse."""
        names = list(names)
        missing = [n for n in names if n not in self.names]
        if missing:
            raise CheckpointError(f"{self.path}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
        unexpected = sorted(set(self.names) - set(names))
        if unexpected:
            raise CheckpointError(f"{self.path}: unexpected tensor {unexpected[0]} ({len(unexpected)} in all)")

    def __call__(self, name: str, shape: torch.Size) -> torch.Tensor:
        """The whole tensor, checked against the shape the model expects."""
        self._check_shape(name, shape)
        return self.read(name)

    def read(self, name: str) -> torch.Tensor:
        return self._rows(name, 0, self._shape(name)[0])

    def slice(self, name: str, shape: torch.Size, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of the flattened tensor, reading only the rows that hold them."""
        self._check_shape(name, shape)
        cols = math.prod(shape[1:])
        first, last = start // cols, -(-end // cols)
        return self._rows(name, first, last).flatten()[start - first * cols:end - first * cols]

    def _check_shape(self, name: str, shape: torch.Size) -> None:
        if tuple(self._shape(name)) != tuple(shape):
            raise CheckpointError(f"{self.path}: tensor {name} has shape {tuple(self._shape(name))}, "
                                  f"the config expects {tuple(shape)}")

    def _stored(self, name: str) -> str:
        stored = hf_name(name, self.head) if self._hf_names else name
        return "model.embed_tokens.weight" if self._tied and stored == "lm_head.weight" else stored

    def _shape(self, name: str) -> list[int]:
        if self.format == "meta":
            pieces = [part[name].shape for part in self._meta_parts]
            dim = _META_CONCAT_DIM.get(name.split(".")[-2])
            shape = list(pieces[0])
            if dim is not None and len(pieces) > 1:
                shape[dim] = sum(piece[dim] for piece in pieces)
            return shape
        return list(self._open(name, lambda t: t.get_shape(), lambda t: t.shape))

    def _rows(self, name: str, first: int, last: int) -> torch.Tensor:
        """Rows [first, last) of a tensor in corral's layout (Meta's wq/wk row order), copied out."""
        if self.format == "meta":
            return _meta_rows([part[name] for part in self._meta_parts], _META_CONCAT_DIM.get(name.split(".")[-2]),
                              first, last)
        heads = _qk_heads(name, self.config) if self._hf_names else None
        if heads is None:
            return self._open(name, lambda t: t[first:last], lambda t: t[first:last].clone())
        # Hugging Face permutes rows within each head: read whole heads, put them back in Meta's order
        head_dim = self.config.head_dim
        lo, hi = first // head_dim * head_dim, -(-last // head_dim) * head_dim
        block = self._open(name, lambda t: t[lo:hi], lambda t: t[lo:hi].clone())
        return permute_hf_to_meta(block, (hi - lo) // head_dim)[first - lo:last - lo]

    def _open(self, name: str, from_safetensors: Callable, from_torch: Callable):
        """Apply a reader to one stored tensor: a safetensors slice handle or a memory-mapped tensor."""
        stored = self._stored(name)
        f = self._files[stored]
        try:
            if f.suffix == ".bin":
                return from_torch(_torch_load(f)[stored])
            with safe_open(str(f), framework="pt") as sf:
                return from_safetensors(sf.get_slice(stored))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: cannot read tensor {stored} ({e}); the file may be truncated") from e


def _meta_rows(pieces: list[torch.Tensor], dim: int | None, first: int, last: int) -> torch.Tensor:
    """Rows [first, last) of a tensor Meta split over model-parallel shards along `dim`."""
    if len(pieces) == 1 or dim is None:  # whole in every shard (norms are replicated)
        return pieces[0][first:last].clone()
    if dim == 1:
        return torch.cat([piece[first:last] for piece in pieces], dim=1)
    rows, offset = [], 0
    for piece in pieces:
        lo, hi = max(first, offset), min(last, offset + piece.shape[0])
        if lo < hi:
            rows.append(piece[lo - offset:hi - offset])
        offset += piece.shape[0]
    return torch.cat(rows)


def _tensor_files(p: Path) -> dict[str, Path]:
    """Which file holds each stored tensor: from the shard index, else each file's header."""
    if (p / INDEX_FILE).is_file():
        weight_map = json.loads((p / INDEX_FILE).read_text())["weight_map"]
        return {name: p / file for name, file in weight_map.items()}
    files = sorted(p.glob("*.safetensors"))
    if not files:
        files = sorted(p.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{p}: no *.safetensors (or pytorch_model*.bin) weights next to its config")
    out = {}
    for f in files:
        try:
            if f.suffix == ".bin":
                names = list(_torch_load(f))
            else:
                with safe_open(str(f), framework="pt") as sf:
                    names = list(sf.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors file ({e}); it may be truncated") from e
        out |= dict.fromkeys(names, f)
    return out


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Transformer:
    """Load a corral, Hugging Face Llama or Meta Llama 2 checkpoint directory as a Transformer."""
    weights = WeightReader(path)
    model = Transformer(weights.config)
    weights.check(name for name, _ in model.named_parameters())
    fill_parameters(model, weights)
    return model.to(dtype).eval()


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer beside a checkpoint (its directory, or the parent for Meta's layout), or a file."""
    p = Path(path)
    if p.is_dir() and not (p / TOKENIZER_FILE).is_file() and (p.parent / TOKENIZER_FILE).is_file():
        p = p.parent
    return _load_tokenizer_file(p)


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
HF_HEADS = {"lm": "lm_head.weight", "reward": "score.weight"}  # LlamaForSequenceClassification's head
_LAYER = re.compile(r"(?:model\.)?layers\.(\d+)\.(.+)")


def hf_name(name: str, head: str = "lm") -> str:
    """Hugging Face's name of a corral tensor."""
    if name == "output.weight":
        return HF_HEADS[head]
    if m := _LAYER.fullmatch(name):
        return HF_NAMES["layers.{i}." + m[2]].format(i=m[1])
    return HF_NAMES[name]


_FROM_HF = {v.removeprefix("model.layers.{i}."): k.removeprefix("layers.{i}.") for k, v in HF_NAMES.items()}


def meta_name(name: str, head: str = "lm") -> str | None:
    """corral's name of a Hugging Face tensor; None for one corral has no use for (rotary caches)."""
    if name == HF_HEADS[head]:
        return "output.weight"
    if m := _LAYER.fullmatch(name):
        return f"layers.{m[1]}.{_FROM_HF[m[2]]}" if m[2] in _FROM_HF else None
    return _FROM_HF.get(name)


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


def _qk_heads(name: str, config: ModelConfig) -> int | None:
    """Heads to permute by for a wq (query heads) or wk (key/value heads) weight, else None."""
    return {"wq": config.n_heads, "wk": config.kv_heads}.get(name.split(".")[-2]) if "attention." in name else None


def _to_hf(name: str, tensor: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    heads = _qk_heads(name, config)
    return tensor if heads is None else permute_meta_to_hf(tensor, heads)


def to_hf(name: str, tensor: torch.Tensor, config: ModelConfig, head: str = "lm") -> tuple[str, torch.Tensor]:
    """One corral tensor under its Hugging Face name and layout (what a checkpoint stores, and what
    vLLM's `load_weights` takes when RLHF refreshes an engine in memory)."""
    return hf_name(name, head), _to_hf(name, tensor, config)


def _from_hf(name: str, tensor: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    heads = _qk_heads(name, config)
    return tensor if heads is None else permute_hf_to_meta(tensor, heads)


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


def hf_config(config: ModelConfig, tokenizer: Tokenizer | None, head: str = "lm",
              dtype: torch.dtype = torch.float32) -> dict:
    """A config.json for LlamaForCausalLM (a reward head: LlamaForSequenceClassification, one label)
    that transformers 4.x and 5.x both read."""
    classifier = {"num_labels": 1, "pad_token_id": 0} if head == "reward" else {}  # reads the last non-pad token
    return {
        "architectures": ["LlamaForSequenceClassification" if head == "reward" else "LlamaForCausalLM"],
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
        "torch_dtype": str(dtype).removeprefix("torch."),
        **classifier,
    }


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

