"""Typed, validated configuration shared by every part of corral.

`ModelConfig` describes a Llama 2 family transformer. The 7B-70B presets carry the numbers of the
released checkpoints (Touvron et al. 2023, "Llama 2", table 1 and Meta's `params.json` files);
`tiny` and `small` are the same architecture with small numbers, sized for a 2-core CPU.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelConfig(BaseModel):
    """The shape of a Llama 2 transformer.

    The FFN width follows Meta's rule when `hidden_dim` is not given: 2/3 of 4*dim, scaled by
    `ffn_dim_multiplier`, rounded up to a multiple of `multiple_of` (7B: 11008, 70B: 28672).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    dim: int = Field(gt=0, description="width of the residual stream")
    n_layers: int = Field(gt=0)
    n_heads: int = Field(gt=0, description="query heads")
    n_kv_heads: int | None = Field(default=None, gt=0, description="key/value heads (GQA); None = n_heads")
    vocab_size: int = Field(gt=0)
    hidden_dim: int | None = Field(default=None, gt=0, description="FFN width; None = Meta's rule below")
    multiple_of: int = Field(default=256, gt=0)
    ffn_dim_multiplier: float | None = Field(default=None, gt=0)
    norm_eps: float = Field(default=1e-5, gt=0)
    rope_theta: float = Field(default=10000.0, gt=0)
    max_seq_len: int = Field(default=4096, gt=0, description="context length")

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"dim / n_heads = {self.head_dim} must be even for rotary embeddings")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def num_params(self) -> int:
        """Exact parameter count (untied embedding and output, as Llama 2)."""
        d, kv = self.dim, self.kv_heads * self.head_dim
        attention = 2 * d * d + 2 * d * kv  # wq, wo, wk, wv
        feed_forward = 3 * d * self.ffn_dim  # w1, w2, w3
        per_layer = attention + feed_forward + 2 * d  # + attention_norm, ffn_norm
        return self.n_layers * per_layer + 2 * self.vocab_size * d + d  # + embeddings, output, norm

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        try:
            return cls(**PRESETS[name])
        except KeyError:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}") from None


PRESETS: dict[str, dict] = {
    # The released Llama 2 checkpoints (params.json); 34B is the paper's unreleased size, whose
    # shape Code Llama 34B shares.
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000),
    "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32000),
    "llama2-34b": dict(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, vocab_size=32000),
    "llama2-70b": dict(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000,
        ffn_dim_multiplier=1.3, multiple_of=4096,
    ),
    # CPU presets: real Llama 2 blocks (GQA included in tiny), small enough to train in minutes.
    "tiny": dict(  # ~3.1M parameters
        dim=192, n_layers=4, n_heads=6, n_kv_heads=2, vocab_size=4096, multiple_of=32, max_seq_len=256,
    ),
    "small": dict(  # ~27M parameters
        dim=512, n_layers=6, n_heads=8, vocab_size=8192, multiple_of=32, max_seq_len=512,
    ),
}
