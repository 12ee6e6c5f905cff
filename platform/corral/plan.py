"""What each step of a pipeline needs on its accelerators, computed before any cluster work.

`plan_step` sizes one training or RLHF step per rank (one accelerator): model states, activations,
logits, generation KV cache, host memory, accelerators, and the time of one optimizer step at a
stated model-FLOPs utilisation. `corral plan SPEC` prints it; `pipeline validate` and `run` refuse
a spec with a step that does not fit (`problem`).

Model states per parameter (Rajbhandari et al. 2020, "ZeRO", sec. 3.1 and 5, with DeepSpeed's own
accounting in `deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs` and
`stage_1_and_2.estimate_zero2_model_states_mem_needs`, which tests/platform/test_plan.py checks):
  bf16: 2 bytes of bf16 parameters, 4 of fp32 gradients (the partition the optimizer steps on)
        and 12 of fp32 optimizer state (master copy, Adam m and v) = 18; below stage 3 the bf16
        gradients (2 more) too, which stage 3 reduces straight into the fp32 partition.
  fp32: 4 parameters, 4 gradients, 8 Adam m and v = 16.
  Stage 1 partitions the optimizer state over the ranks, stage 2 the gradients too, stage 3 the
  parameters too, and stage 3 then gathers one layer at a time: the largest layer's parameters
  and gradients (4 bytes a parameter in bf16) are whole on every rank while it runs. Stage 2
  with bf16 is then 2 + 18/N bytes a parameter and stage 3 18/N + 4 * largest layer, DeepSpeed's
  figures.
  offload_optimizer moves gradients and optimizer state to host memory; offload_params (stage 3)
  the parameters too.

Activations per transformer block and micro-batch (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", sec. 4.1, redone for corral's Llama block; s sequence,
b micro-batch, h dim, f FFN width, a heads, e bytes of the training dtype): autograd saves
  RMSNorm x2: its fp32 input (4sbh), the normalised x before the gain (e*sbh) and the
             output after it, which the next linear layers read (e*sbh)          -> 2 * (4 + 2e) sbh
  attention: q, k, v after RoPE (k and v repeated to n_heads for GQA) and the SDPA
             output, which `wo` reads as a view                                  -> 4e sbh
             + the fp32 log-sum-exp of the flash / memory-efficient kernel       -> 4 a s b
  SwiGLU: w1 x, w3 x, silu(w1 x), their product                                 -> 4e sbf
so one block saves (8 + 8e) sbh + 4e sbf + 4asb bytes: 24sbh + 8sbf (+4asb) in bf16, against
Korthikanti's 34sbh + 5as^2b for GPT (no dropout here, no s^2 scores with flash attention).
With activation checkpointing (per block, non-reentrant) a block keeps only its input (e*sbh) and
one block at a time is recomputed in full during backward. The final RMSNorm adds (4 + 2e) sbh;
the language-model head the fp32 logits the loss reads and the fp32 log-softmax it saves:
8 s b V bytes (a reward model's scalar head: none). tests/platform/test_plan.py measures the
tensors a real forward saves against these counts.

Generation (rejection sampling, PPO rollouts): the KV cache of the engine's 64 sequences of
prompt + max_new_tokens tokens, 2 * n_layers * n_kv_heads * head_dim * e bytes a token, and a
bf16 copy of the weights, both split over the policy's accelerators (a tensor-parallel engine).
RLHF roles are planned as `corral.rlhf.actors` places them (docs/cluster.md): one bundle of
`gpus_per_role` accelerators per rank; the policy and critic are ZeRO-3 groups of `resources.ranks`
ranks; the reference and reward models one bundle each (their whole weights: the reference in the
training dtype, a reward model in fp32), or ZeRO-3 inference groups where `resources.ranks` names
them (1/N of the weights in the training dtype plus the largest layer, gathered). The busiest rank
is the policy's (its share of the model states, its slice of a minibatch, and the engine's bf16
weights and KV cache) or a frozen role's.

Step time: 6 N FLOPs a token (forward and backward; 8 N with checkpointing, which recomputes the
forward) over the step's accelerators at their dense bf16 peak times `mfu`.

Evaluation (the evaluate step's lm-eval benchmarks on accelerators): bf16 weights and the KV cache
of `batch_size` sequences of EVAL_SEQ_TOKENS, both split over the step's accelerators (one GPU, or
a tensor-parallel vLLM engine); its "step" is the whole run, 2 N FLOPs a token over the tokens
the tasks process (BENCHMARK_TOKENS, estimates below).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from pydantic import BaseModel

from corral.config import DeepSpeedConfig, EvaluateConfig, ModelConfig, PretrainConfig, RewardConfig, SFTConfig
from corral.rlhf.config import PPOConfig, RejectionSamplingConfig

GB = 1e9


@dataclass(frozen=True)
class Accelerator:
    memory_bytes: int  # planned capacity: 80 GB of the 85.9 (A100) / 85.5 (H100) physical, the rest for
    # the CUDA context, NCCL buffers and allocator fragmentation
    peak_bf16_flops: float  # dense, no sparsity


ACCELERATORS = {
    # NVIDIA A100 Tensor Core GPU datasheet (2021): BF16 312 TFLOPS dense, 80 GB HBM2e.
    "A100": Accelerator(80 * 10**9, 312e12),
    # NVIDIA H100 Tensor Core GPU datasheet (2023), SXM: BF16 989 TFLOPS dense (1,979 with sparsity), 80 GB HBM3.
    "H100": Accelerator(80 * 10**9, 989e12),
}
GPUS_PER_NODE = 8  # p4d/p4de/p5, a2-ultragpu/a3: the nodes the specs and infra/ manifests assume
DEFAULT_MFU = 0.4  # model-FLOPs utilisation assumed for step time (Megatron-LM at this scale: 0.4-0.55)
ENGINE_SEQUENCES = 64  # sequences the generation engine decodes at once (corral.rlhf.actors)
PROMPT_TOKENS = 512  # prompt budget planned for RLHF sequences (Llama 2's RLHF prompts are single turns)
LOGITS_BYTES = 8  # per (token, vocab entry): fp32 logits + the fp32 log-softmax cross-entropy saves


@dataclass
class StepPlan:
    """One step's plan. Bytes are per accelerator (one rank) unless named per node."""

    step: str
    uses: str
    accelerator_type: str | None  # None: trains on CPU, accelerator memory not checked
    accelerators: int
    nodes: int
    micro_batch: int  # sequences per rank per forward
    seq_len: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int  # as configured (checkpointing on or off)
    activations_no_checkpointing_bytes: int
    activations_checkpointing_bytes: int
    logits_bytes: int
    kv_cache_bytes: int  # generation (RLHF steps), incl. the engine's bf16 weights
    per_accelerator_bytes: int
    accelerator_memory_bytes: int | None
    fits: bool
    host_bytes_per_node: int  # offloaded states + loading one tensor per rank in fp32
    tokens_per_step: int | None
    step_time_s: float | None  # at `mfu`; None on CPU and for RLHF steps (generation-bound)
    mfu: float
    knob: str  # where to turn when it does not fit: the field path in the step's config
    frozen_role: str = ""  # RLHF: the frozen role (reference, reward model) whose rank holds the most
    frozen_bytes: int = 0  # what one rank of it holds

    def problem(self) -> str | None:
        """Why the step cannot run on its accelerators, with the knob to turn; None when it fits."""
        if self.fits:
            return None
        short = (self.per_accelerator_bytes - self.accelerator_memory_bytes) / GB
        states = self.params_bytes + self.grads_bytes + self.optimizer_bytes
        parts = (f"parameters+gradients+optimizer {states / GB:.1f} GB, "
                 f"activations {self.activations_bytes / GB:.1f} GB, logits {self.logits_bytes / GB:.1f} GB")
        if self.kv_cache_bytes:
            parts += f", KV cache {self.kv_cache_bytes / GB:.1f} GB"
        if self.frozen_bytes == self.per_accelerator_bytes:
            parts = f"the {self.frozen_role} model's weights on one rank"
        return (f"step {self.step!r} needs {self.per_accelerator_bytes / GB:.1f} GB per {self.accelerator_type} "
                f"({parts}), {short:.1f} GB more than its {self.accelerator_memory_bytes / GB:.0f} GB; {self.knob}")

    def as_dict(self) -> dict:
        return asdict(self)


def dtype_bytes(ds: DeepSpeedConfig) -> int:
    return 2 if ds.bf16 else 4


def largest_layer_params(model: ModelConfig) -> int:
    """Parameters of the largest single module (what ZeRO-3 gathers whole): embedding/head or an FFN matrix."""
    return max(model.vocab_size * model.dim, model.dim * model.ffn_dim)


def model_state_bytes(model: ModelConfig, ds: DeepSpeedConfig, ranks: int) -> tuple[int, int, int, int]:
    """(parameters, gradients, optimizer state) bytes on one accelerator and the bytes offloaded to
    its host, for `ranks` data-parallel ranks sharing the model under `ds` (see the module docstring)."""
    n, e, stage = model.num_params(), dtype_bytes(ds), ds.zero_stage
    shards = ranks if stage >= 1 else 1  # from stage 1 optimizer state and fp32 gradients are partitioned
    params = n * e / ranks if stage == 3 else n * e
    if ds.bf16:  # the fp32 gradient partition the optimizer steps on, and below stage 3 the bf16 gradients
        grads = n * 4 / shards + (n * 2 / (ranks if stage == 2 else 1) if stage < 3 else 0)
    else:
        grads = n * 4 / (ranks if stage >= 2 else 1)
    optimizer = n * (12 if ds.bf16 else 8) / shards  # fp32 master + Adam m and v, or only m and v
    host = 0.0
    if ds.offload_optimizer:  # gradient partitions and optimizer state live and step on the host
        host, grads, optimizer = n * 4 / shards + optimizer, 0, 0
    if stage == 3:  # one layer gathered whole, with its gradient
        params = (0 if ds.offload_params else params) + 2 * e * largest_layer_params(model)
        host += n * e / ranks if ds.offload_params else 0
    return int(params), int(grads), int(optimizer), int(host)


def block_activation_bytes(model: ModelConfig, seq_len: int, micro_batch: int, e: int) -> int:
    """Bytes one transformer block saves for backward (module docstring; Korthikanti et al. 2022, redone)."""
    sb = seq_len * micro_batch
    return sb * ((8 + 8 * e) * model.dim + 4 * e * model.ffn_dim + 4 * model.n_heads)


def activation_bytes(model: ModelConfig, seq_len: int, micro_batch: int, e: int, checkpointing: bool) -> int:
    """Activations of the whole stack for one micro-batch, with or without per-block checkpointing."""
    block = block_activation_bytes(model, seq_len, micro_batch, e)
    final_norm = (4 + 2 * e) * seq_len * micro_batch * model.dim
    if not checkpointing:
        return model.n_layers * block + final_norm
    # the input of every block, and one block recomputed at a time
    return model.n_layers * e * seq_len * micro_batch * model.dim + block + final_norm


def logits_bytes(model: ModelConfig, seq_len: int, micro_batch: int) -> int:
    return LOGITS_BYTES * seq_len * micro_batch * model.vocab_size


def kv_cache_bytes(model: ModelConfig, tokens: int, e: int) -> int:
    """K and V of every layer for `tokens` cached tokens."""
    return 2 * model.n_layers * model.kv_heads * model.head_dim * e * tokens


# Tokens each task of the paper's preset runs through the model at its shots: documents in the
# split lm-eval scores (the datasets' cards) x prompt (+ continuation) tokens, estimated with the
# Llama 2 tokenizer's ~1.3 tokens a word. Multiple-choice continuations that share a prompt
# (MMLU's letters) cost one forward; HellaSwag's and ARC's endings one each.
BENCHMARK_TOKENS = {
    "mmlu": 14_042 * 660,  # 5-shot prompts
    "gsm8k": 1_319 * (9 * 150 + 256),  # 8 worked examples + the question, up to 256 generated
    "corral_humaneval": 164 * (150 + 512),  # prompt + up to 512 generated
    "hellaswag": 10_042 * 4 * 90,
    "arc_easy": 2_376 * 4 * 40,
    "arc_challenge": 1_172 * 4 * 45,
    "winogrande": 1_267 * 2 * 40,
    "piqa": 1_838 * 2 * 60,
    "boolq": 3_270 * 2 * 150,
}
OTHER_TASK_TOKENS = 1_000_000  # a task not listed above
EVAL_SEQ_TOKENS = 2048  # the longest request planned: GSM8K's 8-shot prompt and its answer


def plan_step(step: str, uses: str, cfg: BaseModel, model: ModelConfig, mfu: float = DEFAULT_MFU) -> StepPlan | None:
    """The plan of one pipeline step; None for steps that train or generate nothing (tokenizer, data, ...)."""
    if isinstance(cfg, (PretrainConfig, SFTConfig, RewardConfig)):
        res, ds = cfg.resources, cfg.deepspeed
        seq = (cfg.seq_len if isinstance(cfg, SFTConfig) else None) or model.max_seq_len
        mb = cfg.loop.micro_batch_size
        return _plan(step, uses, model, ds, mfu, accelerator_type=res.accelerator_type if res.gpus_per_worker else None,
                     accelerators=math.ceil(res.num_workers * res.gpus_per_worker), ranks=res.num_workers,
                     micro_batch=mb, seq_len=seq, lm_head=not isinstance(cfg, RewardConfig), generated_tokens=0,
                     tokens_per_step=mb * ds.grad_accum_steps * res.num_workers * seq,
                     knob=_knob(ds, "loop.micro_batch_size", "resources.num_workers"))
    if isinstance(cfg, (RejectionSamplingConfig, PPOConfig)):
        res, ds = cfg.resources, cfg.deepspeed
        ranks = res.ranks_of("policy")  # the busiest rank: the policy's, which also holds the engine
        generated = min(model.max_seq_len, PROMPT_TOKENS + cfg.max_new_tokens)  # prompt + reply
        if isinstance(cfg, PPOConfig):  # trains on the rollouts; roles: policy, critic, reference, 2 rewards
            rows, field, seq = cfg.minibatch_size, "minibatch_size", generated
            frozen = {"reference": dtype_bytes(ds), "helpful": 4, "safety": 4}  # a lone reward model is fp32
            bundles = ranks + res.ranks_of("critic") + sum(res.ranks_of(r) for r in frozen)
        else:  # fine-tunes on packed rows of the best replies; roles: policy, 2 rewards
            rows, field, seq = cfg.micro_batch_size, "micro_batch_size", cfg.seq_len
            frozen = {"helpful": 4, "safety": 4}
            bundles = ranks + sum(res.ranks_of(r) for r in frozen)
        # a frozen role's rank: its weights, or under ZeRO-3 inference its share plus one gathered layer
        frozen_bytes = {role: model.num_params() * e if res.group_of(role) is None else
                        dtype_bytes(ds) * (model.num_params() / res.group_of(role) + largest_layer_params(model))
                        for role, e in frozen.items()}
        mb = math.ceil(rows / (ranks * ds.grad_accum_steps))  # rows of one gradient step, over the group's ranks
        rollout = cfg.rollout
        if rollout.engine == "vllm":  # engines on GPUs of their own (corral.rlhf.generators)
            tp = rollout.vllm.tensor_parallel_size
            engines, sequences = rollout.num_engines * tp if res.gpus_per_role else 0, rollout.max_batch_size
        else:  # the policy's ranks decode
            tp, engines, sequences = None, 0, ENGINE_SEQUENCES
        return _plan(step, uses, model, ds, mfu, accelerator_type=res.accelerator_type if res.gpus_per_role else None,
                     accelerators=math.ceil(bundles * res.gpus_per_role) + engines, ranks=ranks, micro_batch=mb,
                     seq_len=seq, lm_head=True, generated_tokens=sequences * generated, tokens_per_step=None,
                     knob=_knob(ds, field, "resources.ranks.policy"), engine_tp=tp, frozen_bytes=frozen_bytes)
    if isinstance(cfg, EvaluateConfig) and cfg.benchmarks is not None and cfg.resources.gpus_per_worker:
        return _plan_evaluation(step, uses, cfg, model, mfu)
    return None


def _plan_evaluation(step: str, uses: str, cfg: EvaluateConfig, model: ModelConfig, mfu: float) -> StepPlan:
    """The evaluate step's benchmarks: bf16 weights + KV cache over its accelerators, and the run's time."""
    res, bench = cfg.resources, cfg.benchmarks
    accel = ACCELERATORS.get(res.accelerator_type) if res.accelerator_type else None
    if res.accelerator_type and accel is None:
        raise ValueError(f"step {step!r}: accelerator_type {res.accelerator_type!r} is not one corral.plan can size; "
                         f"use one of {', '.join(ACCELERATORS)}")
    accelerators = math.ceil(res.num_workers * res.gpus_per_worker)
    weights = 2 * model.num_params() // accelerators
    kv = kv_cache_bytes(model, bench.batch_size * min(EVAL_SEQ_TOKENS, model.max_seq_len), 2) // accelerators
    tasks, _ = bench.resolved()
    share = bench.limit if isinstance(bench.limit, float) else 1.0  # an int limit caps documents: ignored here
    tokens = int(share * sum(BENCHMARK_TOKENS.get(t, OTHER_TASK_TOKENS) for t in tasks))
    memory = accel.memory_bytes if accel else None
    time = 2 * model.num_params() * tokens / (accelerators * accel.peak_bf16_flops * mfu) if accel else None
    return StepPlan(
        step=step, uses=uses, accelerator_type=res.accelerator_type if accel else None,
        accelerators=accelerators if accel else 0, nodes=math.ceil(accelerators / GPUS_PER_NODE) if accel else 0,
        micro_batch=bench.batch_size, seq_len=EVAL_SEQ_TOKENS, params_bytes=weights, grads_bytes=0,
        optimizer_bytes=0, activations_bytes=0, activations_no_checkpointing_bytes=0,
        activations_checkpointing_bytes=0, logits_bytes=0, kv_cache_bytes=kv, per_accelerator_bytes=weights + kv,
        accelerator_memory_bytes=memory, fits=memory is None or weights + kv <= memory,
        host_bytes_per_node=4 * largest_layer_params(model) * min(accelerators, GPUS_PER_NODE),
        tokens_per_step=tokens, step_time_s=time, mfu=mfu,
        knob="lower benchmarks.batch_size, or raise resources.gpus_per_worker (a tensor-parallel vLLM engine)")


def _plan(step: str, uses: str, model: ModelConfig, ds: DeepSpeedConfig, mfu: float, *, accelerator_type: str | None,
          accelerators: int, ranks: int, micro_batch: int, seq_len: int, lm_head: bool, generated_tokens: int,
          tokens_per_step: int | None, knob: str, engine_tp: int | None = None,
          frozen_bytes: dict[str, float] | None = None) -> StepPlan:
    """The busiest rank of a step: `ranks` share the model under ZeRO, each runs `micro_batch`
    sequences of `seq_len`; a step that generates also holds the engine's weights and KV cache, on the
    same ranks, or with `engine_tp` on GPUs of its own (vLLM engines of that tensor-parallel size).
    `frozen_bytes`: what one rank of each frozen RLHF role holds, when one of them is the busiest."""
    accel = ACCELERATORS.get(accelerator_type) if accelerator_type else None
    if accelerator_type and accel is None:
        raise ValueError(f"step {step!r}: accelerator_type {accelerator_type!r} is not one corral.plan can size; "
                         f"use one of {', '.join(ACCELERATORS)}, or add its memory and bf16 peak to "
                         f"corral.plan.ACCELERATORS")
    e = dtype_bytes(ds)
    params, grads, optim, host = model_state_bytes(model, ds, ranks)
    acts = {on: activation_bytes(model, seq_len, micro_batch, e, on) for on in (False, True)}
    logits = logits_bytes(model, seq_len, micro_batch) if lm_head else 0
    kv = 0
    if generated_tokens:  # the engine: bf16 weights and KV cache, split over the role's or the engine's accelerators
        kv = (2 * model.num_params() + kv_cache_bytes(model, generated_tokens, 2)) // (engine_tp or ranks)
    train = params + grads + optim + acts[ds.activation_checkpointing] + logits
    per_rank = train + kv if engine_tp is None else max(train, kv)
    memory = accel.memory_bytes if accel else None
    if engine_tp is not None and memory is not None and kv > memory:
        knob = "raise rollout.vllm.tensor_parallel_size or lower rollout.max_batch_size (a vLLM engine does not fit)"
    role, frozen = max((frozen_bytes or {"": 0}).items(), key=lambda item: item[1])
    if memory is not None and frozen > memory:
        knob = f"set resources.ranks.{role} (its model does not fit one accelerator: a ZeRO-3 group splits it)"
    per_rank = max(per_rank, int(frozen))
    ranks_per_node = min(ranks, GPUS_PER_NODE) if accel else 1
    loading = 4 * largest_layer_params(model) * ranks_per_node  # each rank reads one tensor at a time, in fp32
    time = None
    if accel and tokens_per_step is not None:
        flops = (8 if ds.activation_checkpointing else 6) * model.num_params() * tokens_per_step
        time = flops / (accelerators * accel.peak_bf16_flops * mfu)
    return StepPlan(
        step=step, uses=uses, accelerator_type=accelerator_type if accel else None,
        accelerators=accelerators if accel else 0, nodes=math.ceil(accelerators / GPUS_PER_NODE) if accel else 0,
        micro_batch=micro_batch, seq_len=seq_len, params_bytes=params, grads_bytes=grads, optimizer_bytes=optim,
        activations_bytes=acts[ds.activation_checkpointing], activations_no_checkpointing_bytes=acts[False],
        activations_checkpointing_bytes=acts[True], logits_bytes=logits, kv_cache_bytes=kv,
        per_accelerator_bytes=per_rank, accelerator_memory_bytes=memory, fits=memory is None or per_rank <= memory,
        host_bytes_per_node=host * ranks_per_node + loading, tokens_per_step=tokens_per_step, step_time_s=time,
        mfu=mfu, knob=knob, frozen_role=role, frozen_bytes=int(frozen))


def _knob(ds: DeepSpeedConfig, batch_field: str, more_ranks: str) -> str:
    """The first thing to change when a step does not fit, in the order that costs least throughput."""
    if not ds.activation_checkpointing:  # keeps ~1/20 of a block's activations (its input), for a third more compute
        return "set deepspeed.activation_checkpointing: true"
    if ds.zero_stage < 3:
        return "set deepspeed.zero_stage: 3 (shards parameters too)"
    return (f"lower {batch_field} (raise deepspeed.grad_accum_steps to keep the batch), raise {more_ranks}, "
            "or set deepspeed.offload_optimizer: true")


def table(plans: list[StepPlan]) -> str:
    """A human-readable summary: one line per step, GB per accelerator."""
    head = f"{'step':<20}{'accel':>7}{'count':>7}{'nodes':>6}{'mb':>4}{'states':>9}{'activ':>8}{'logits':>8}" \
           f"{'kv':>7}{'total':>8}{'of':>6}  {'fits':<5}{'step s':>8}"
    rows = [head]
    for p in plans:
        states = (p.params_bytes + p.grads_bytes + p.optimizer_bytes) / GB
        mem = f"{p.accelerator_memory_bytes / GB:.0f}" if p.accelerator_memory_bytes else "-"
        t = f"{p.step_time_s:.1f}" if p.step_time_s is not None else "-"
        rows.append(f"{p.step:<20}{p.accelerator_type or 'CPU':>7}{p.accelerators:>7}{p.nodes:>6}{p.micro_batch:>4}"
                    f"{states:>9.1f}{p.activations_bytes / GB:>8.1f}{p.logits_bytes / GB:>8.1f}"
                    f"{p.kv_cache_bytes / GB:>7.1f}{p.per_accelerator_bytes / GB:>8.1f}{mem:>6}  "
                    f"{'yes' if p.fits else 'NO':<5}{t:>8}")
    rows.append(f"GB per accelerator (1e9 bytes); step s: one optimizer step (evaluate: the whole benchmark run) "
                f"at {plans[0].mfu:.0%} MFU" if plans
                else "no step trains or generates")
    return "\n".join(rows)
