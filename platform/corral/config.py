"""Typed, validated configuration shared by every part of corral.

`ModelConfig` describes a Llama 2 family transformer. The 7B-70B presets carry the numbers of the
released checkpoints (Touvron et al. 2023, "Llama 2", table 1 and Meta's `params.json` files);
`tiny` and `small` are the same architecture with small numbers, sized for a 2-core CPU.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from corral.paper import BENCHMARK_PRESETS


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


# == Step configs ================================================================================
# Every step's config lives here (the RLHF steps' in `corral.rlhf.config`). Each is pydantic with
# extra="forbid", so a pipeline spec validates each step's block (and names the bad field) before
# any cluster work starts. A step's `output_dir` left unset means the pipeline's step directory
# (or `$CORRAL_HOME/runs/<step>` for a step run on its own).


class DeepSpeedConfig(BaseModel):
    """How the DeepSpeed strategy shards and steps the model (see `corral.train.strategy`)."""

    model_config = ConfigDict(extra="forbid")

    zero_stage: int = Field(default=3, ge=0, le=3, description="0 = plain data parallel, 3 = shard params too")
    bf16: bool = True  # native on A100/H100; on a CPU it pays only for large matmuls (the tiny spec uses fp32)
    offload_optimizer: bool = False  # optimizer state in host memory (stage >= 1)
    offload_params: bool = False  # parameters in host memory (stage 3 only)
    grad_accum_steps: int = Field(default=1, ge=1)
    grad_clip: float = Field(default=1.0, ge=0, description="max global grad norm; 0 disables (Llama 2: 1.0)")
    activation_checkpointing: bool = Field(
        default=False, description="recompute each transformer block in backward: activations per layer "
        "shrink to the block's input, for about a third more compute")

    @model_validator(mode="after")
    def _check_offload(self) -> "DeepSpeedConfig":
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        return self


class OptimConfig(BaseModel):
    """AdamW with a cosine schedule: the Llama 2 pretraining recipe by default."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(default=3e-4, gt=0, description="peak learning rate (Llama 2 7B/13B)")
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="cosine decays to this fraction of peak")
    warmup_steps: int = Field(default=2000, ge=0)
    schedule: str = Field(default="cosine", pattern="^(cosine|constant)$")
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)  # not 0.999: Llama 2's value, steadier at scale
    eps: float = Field(default=1e-5, gt=0)  # not 1e-8: Llama 2's value
    weight_decay: float = Field(default=0.1, ge=0, description="on matrices and embeddings only, not norms")


class ResourcesConfig(BaseModel):
    """What one training run asks of the Ray cluster (becomes Ray Train's ScalingConfig)."""

    model_config = ConfigDict(extra="forbid")

    num_workers: int = Field(default=1, ge=1)
    cpus_per_worker: float = Field(default=1, gt=0)
    gpus_per_worker: float = Field(default=0, ge=0, description="0 trains on CPU")
    accelerator_type: str | None = Field(default=None, description="e.g. 'A100' or 'H100'; None = any")
    placement_timeout_s: float | None = Field(
        default=900, gt=0, description="fail, naming what did not fit, if the cluster cannot place the workers in "
        "this time (an autoscaler may be adding nodes); None = wait as long as it takes")


class TrackingConfig(BaseModel):
    """Where MLflow records the run; the server comes from MLFLOW_TRACKING_URI."""

    model_config = ConfigDict(extra="forbid")

    experiment: str = "corral"
    run_name: str | None = None


class TokenizerConfig(BaseModel):
    """The tokenizer step: SentencePiece BPE with Llama 2's settings, trained on the corpus."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[str] = Field(min_length=1, description="text, JSONL or Parquet files, directories or URIs (s3://...)")
    vocab_size: int = Field(default=32000, ge=300, description="Llama 2: 32000; the tiny preset: 4096")
    max_sentences: int = Field(default=2_000_000, gt=0, description="lines sampled for training")
    output_dir: str | None = Field(default=None, description="None = the pipeline's step directory")


class DedupConfig(BaseModel):
    """Duplicate documents dropped before tokenisation (corral.data.dedup; docs/data.md): exact copies by
    a hash of the normalised text, near copies by MinHash LSH (datasketch), across the whole corpus."""

    model_config = ConfigDict(extra="forbid")

    exact: bool = Field(default=False, description="drop documents whose text, lower-cased with whitespace "
                        "collapsed, equals an earlier one's (the first in file order is kept)")
    near: bool = Field(default=False, description="drop documents whose estimated Jaccard similarity of word "
                       "shingles to another is at least `threshold`; one per cluster is kept")
    threshold: float = Field(default=0.8, gt=0, lt=1, description="Jaccard similarity of shingle sets from which "
                             "two documents are near duplicates (0.8: a few words changed in a page); at the "
                             "defaults LSH makes pairs at 0.8 candidates with probability 0.74, at 0.9 0.994 "
                             "(docs/data.md)")
    num_perm: int = Field(default=128, ge=16, le=1024, description="MinHash permutations: the estimate's standard "
                          "error is about sqrt(J(1-J)/num_perm), 0.035 at J=0.8")
    shingle_words: int = Field(default=5, ge=1, description="words per shingle (lower-cased word n-grams)")


class PrepareDataConfig(BaseModel):
    """The data preparation step: corpus files -> packed token blocks + manifest."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[str] = Field(min_length=1, description="files, directories or object-store URIs (s3://...)")
    tokenizer: str | None = Field(default=None, description="tokenizer.model or its directory; else from inputs")
    seq_len: int = Field(default=256, gt=0, description="model context; blocks hold seq_len + 1 tokens")
    val_fraction: float = Field(default=0.05, ge=0, lt=1, description="share of documents held out")
    shard_blocks: int = Field(default=4096, gt=0, description="blocks per shard file (up to twice this; a "
                              "split's last shards may hold fewer); size it to the corpus: docs/data.md")
    object_store_mb: int = Field(default=512, gt=0, description="Ray Data's object-store budget for the step's "
                                 "data in flight: what bounds its memory, whatever the corpus size; at least "
                                 "two shards (a write task's input is one)")
    scrub_pii: bool = Field(default=False, description="replace e-mails, phone numbers, IP addresses, card numbers "
                            "and IBANs by typed placeholders (corral.data.hygiene); counts in the manifest")
    blocked_domains: list[str] = Field(default=[], description="drop documents whose JSONL `url` is on one of these "
                                       "domains or under it (sites known to hold much personal information)")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="exact and near-duplicate removal; "
                               "off unless switched on (the 7B-70B specs do)")
    docs_per_batch: int = Field(default=16, gt=0, description="documents packed together by one UDF call; "
                                "each batch drops its last partial block per split")
    num_tokenizer_actors: int = Field(default=1, ge=1)
    output_dir: str | None = Field(default=None, description="None = the pipeline's step directory")


class TrainLoopConfig(BaseModel):
    """The schedule of a training run, shared by pretraining and the later stages."""

    model_config = ConfigDict(extra="forbid")

    micro_batch_size: int = Field(default=8, ge=1, description="sequences per worker per forward")
    max_steps: int = Field(default=1000, ge=1, description="optimizer steps")
    eval_every: int = Field(default=100, ge=1)
    eval_batches: int = Field(default=4, ge=1, description="global validation batches per evaluation")
    checkpoint_every: int = Field(default=100, ge=1)
    log_every: int = Field(default=1, ge=1)
    seed: int = 0
    max_failures: int = Field(default=2, ge=0, description="worker deaths survived by restarting from a checkpoint")
    export_shard_mb: int = Field(default=5120, gt=0, description="largest safetensors file of the exported model "
                                 "(Hugging Face's default: 5 GB)")


class PretrainConfig(BaseModel):
    """The pretraining step: a Llama 2 model trained from scratch on packed token blocks."""

    model_config = ConfigDict(extra="forbid")

    model: str | ModelConfig = Field(default="tiny", description="a preset name or a full ModelConfig")
    data_dir: str | None = Field(default=None, description="prepare_data output; None = from the step inputs")
    output_dir: str | None = Field(default=None, description="checkpoints and the final model; None = the "
                                   "pipeline's step directory")
    loop: TrainLoopConfig = TrainLoopConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    optim: OptimConfig = OptimConfig()
    resources: ResourcesConfig = ResourcesConfig()
    tracking: TrackingConfig = TrackingConfig()

    def model_config_resolved(self) -> ModelConfig:
        return ModelConfig.preset(self.model) if isinstance(self.model, str) else self.model


# == Alignment configs: SFT, reward models, evaluation ==========================================


class TaskSuiteConfig(BaseModel):
    """The synthetic task suite (`corral.data.tasks`): a step's data when it is given no files."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    train_size: int = Field(default=20000, gt=0, description="training records drawn")
    eval_size: int = Field(default=400, gt=0, description="held-out records (validation / evaluation)")


class SFTConfig(BaseModel):
    """Supervised fine-tuning: loss on answers only, packed dialogs, Ghost Attention (Llama 2, 3.1)."""

    model_config = ConfigDict(extra="forbid")

    base_model: str | None = Field(default=None, description="any checkpoint load_model reads; None = upstream")
    data: list[str] = Field(default=[], description="SFT JSONL/Parquet files; empty = the task suite")
    validation_data: list[str] = Field(default=[], description="empty = the suite's held-out split, or val_fraction")
    val_fraction: float = Field(default=0.05, gt=0, lt=1, description="records held out of `data` for validation")
    tasks: TaskSuiteConfig = TaskSuiteConfig()
    epochs: float = Field(default=2.0, gt=0, description="passes over the packed data; sets loop.max_steps")
    seq_len: int | None = Field(default=None, gt=1, description="packed row length; None = the model's context")
    gatt: bool = Field(default=True, description="Ghost Attention on records marked `gatt`")
    output_dir: str | None = Field(default=None, description="None = the pipeline's step directory")
    loop: TrainLoopConfig = TrainLoopConfig(eval_every=50, checkpoint_every=200)
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    optim: OptimConfig = OptimConfig(lr=2e-5, warmup_steps=0)  # Llama 2 SFT: 2e-5, cosine, weight decay 0.1
    resources: ResourcesConfig = ResourcesConfig()
    tracking: TrackingConfig = TrackingConfig()


class GuardConfig(SFTConfig):
    """A Llama Guard-style safety classifier (`corral.guard`), fine-tuned by the SFT job from any
    checkpoint (Llama Guard started from Llama 2 7B). Data: `guard` records (a conversation, whether
    its last turn is unsafe, the violated categories) from files, or the task suite's safety family."""

    data: list[str] = Field(default=[], description="guard JSONL/Parquet files; empty = the task suite")
    validation_data: list[str] = Field(default=[], description="held-out guard records (precision/recall); "
                                       "empty = the suite's held-out split, or val_fraction of `data`")
    categories: dict[str, str] = Field(default={}, description="taxonomy: code -> name, as the guard's prompt "
                                       "lists it; empty = the task suite's (corral.data.tasks.UNSAFE_CATEGORIES)")
    tasks: TaskSuiteConfig = TaskSuiteConfig(train_size=4000, eval_size=400)
    gatt: bool = False  # a guard dialog has one turn


class RewardConfig(BaseModel):
    """A reward model (Llama 2, 3.2.2): helpfulness, or safety with some helpfulness data mixed in."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(default="helpfulness", pattern="^(helpfulness|safety)$")
    base_model: str | None = Field(default=None, description="the SFT checkpoint; None = upstream `model`")
    data: list[str] = Field(default=[], description="preference JSONL/Parquet files; empty = the task suite")
    eval_data: list[str] = Field(default=[], description="held-out pairs; empty = the suite's held-out split")
    val_fraction: float = Field(default=0.05, gt=0, lt=1, description="pairs held out of `data` when no eval_data")
    tasks: TaskSuiteConfig = TaskSuiteConfig(train_size=4000, eval_size=400)
    helpfulness_mix: float = Field(default=0.1, ge=0, lt=1, description="share of helpfulness pairs (safety)")
    safety_mix: float = Field(default=0.1, ge=0, lt=1, description="share of safety pairs (helpfulness; Llama 2's "
                              "helpfulness model also sees Meta Safety data)")
    pairs_per_prompt: int = Field(default=1, ge=1, le=4, description="task suite, helpfulness: pairs drawn per "
                                  "training prompt, one per rating (its right answer against several wrong ones)")
    far_per_prompt: int = Field(default=0, ge=0, le=3, description="task suite, helpfulness: more wrong answers "
                                "well off the right one (rated better) for each sum, difference and count prompt")
    margin: str = Field(default="large", pattern="^(large|small|none)$", description="m(rating) in the loss")
    epochs: float = Field(default=1.0, gt=0, description="Llama 2 trains reward models for one epoch")
    output_dir: str | None = Field(default=None, description="None = the pipeline's step directory")
    loop: TrainLoopConfig = TrainLoopConfig(eval_every=50, checkpoint_every=200)
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    optim: OptimConfig = OptimConfig(lr=1e-5, warmup_steps=0)  # Llama 2: 1e-5 (5e-6 for 70B), cosine to 10 %
    resources: ResourcesConfig = ResourcesConfig()
    tracking: TrackingConfig = TrackingConfig()


class BenchmarksConfig(BaseModel):
    """lm-eval tasks to run: a preset's tasks and shots, plus or overridden by `tasks`/`num_fewshot`."""

    model_config = ConfigDict(extra="forbid")

    preset: str | None = Field(default=None, description="'llama2-paper': the paper's benchmarks and shots")
    tasks: list[str] = Field(default=[], description="lm-eval task or group names, e.g. hellaswag, mmlu")
    num_fewshot: dict[str, int] = Field(default={}, description="shots per task; unnamed = the preset's, else "
                                                                "the task's own default")
    limit: int | float | None = Field(default=None, gt=0, description="documents per task (a fraction if < 1); "
                                                                     "None = all")
    include_path: list[str] = Field(default=[], description="directories of your own task YAMLs")
    batch_size: int = Field(default=16, ge=1, description="sequences per forward / engine slots")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, preset: str | None) -> str | None:
        if preset is not None and preset not in BENCHMARK_PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(BENCHMARK_PRESETS)}")
        return preset

    def resolved(self) -> tuple[list[str], dict[str, int]]:
        """The tasks to run and their shots, the preset's first."""
        shots = dict(BENCHMARK_PRESETS[self.preset]) if self.preset else {}
        tasks = list(shots) + [t for t in self.tasks if t not in shots]
        return tasks, shots | self.num_fewshot


class EvaluateConfig(BaseModel):
    """Evaluation of a checkpoint: perplexity, task accuracy, refusals, rewards, benchmarks."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description="checkpoint to evaluate; None = upstream `model`")
    helpfulness_reward_model: str | None = Field(default=None, description="None = upstream, if any")
    safety_reward_model: str | None = Field(default=None, description="None = upstream, if any")
    eval_data: list[str] = Field(default=[], description="eval-format JSONL/Parquet; empty = the task suite")
    tasks: TaskSuiteConfig = TaskSuiteConfig(eval_size=40)  # eval_size: items per family
    benchmarks: BenchmarksConfig | None = Field(default=None, description="lm-eval tasks; None = none")
    resources: ResourcesConfig = Field(default=ResourcesConfig(), description="where the benchmarks run: "
                                       "gpus_per_worker > 0 puts them on an accelerator (bf16)")
    max_tokens: int = Field(default=32, gt=0, description="greedy tokens generated per reply")
    output_dir: str | None = Field(default=None, description="None = the pipeline's step directory")
    tracking: TrackingConfig = TrackingConfig()


# == Registration ==============================================================================


class Gate(BaseModel):
    """Bounds one evaluation metric must meet for `champion` to move to the new version."""

    model_config = ConfigDict(extra="forbid")
    min: float | None = Field(default=None, description="the metric must be at least this")
    max: float | None = Field(default=None, description="the metric must be at most this")

    @model_validator(mode="after")
    def _one_bound(self) -> "Gate":
        if self.min is None and self.max is None:
            raise ValueError("a gate needs min or max")
        return self

    def passes(self, value: float | None) -> bool:
        return value is not None and (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


class ModelEntry(BaseModel):
    """One model to register: a name in the registry and the step whose `model` output it is."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="registered model name, e.g. llama2-tiny-chat")
    from_step: str = Field(description="the step whose `model` output is this model")


class RegisterConfig(BaseModel):
    """The register step: each model becomes a new version with the alias `candidate`; `champion`
    moves to it only when every gate passes."""

    model_config = ConfigDict(extra="forbid")
    models: list[ModelEntry] = Field(min_length=1)
    metrics_from: str | None = Field(default=None, description="the evaluate step whose metrics tag the versions")
    gates: dict[str, Gate] = Field(default={}, description="metric -> bounds; all must pass to move `champion`")
