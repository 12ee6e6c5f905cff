"""Configs of the two RLHF steps: rejection sampling and PPO (pydantic, extra="forbid").

Defaults are the Llama 2 paper's numbers (section 3.2.3); the tiny pipeline spec overrides the
ones a 3M-parameter model on a 2-core CPU needs changed (learning rates, batch sizes, lengths).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from corral.config import DeepSpeedConfig, ModelConfig, OptimConfig, TaskSuiteConfig, TrackingConfig
from corral.vllm_engine import VllmArgs


class PromptsConfig(BaseModel):
    """Where the RL prompts come from: files, else the synthetic task suite.

    Files hold rl_prompts records (`{"prompt": str | messages, "safety": bool}`, optionally
    `answer` or `refuse` to judge replies by) or, with `format: sft`, SFT dialogs whose prompts
    (every turn but the last answer) are used. Without `eval_data`, files give no held-out set.
    """

    model_config = ConfigDict(extra="forbid")

    data: list[str] = Field(default=[], description="prompt JSONL/Parquet files; empty = the task suite")
    eval_data: list[str] = Field(default=[], description="held-out prompt files, scored before and after")
    format: str = Field(default="rl_prompts", pattern="^(rl_prompts|sft)$", description="the files' format")
    suite_seed: int = 0
    n_train: int = Field(default=512, ge=1, description="suite prompts to train on")
    n_eval: int = Field(default=64, ge=0, description="held-out suite prompts scored before and after; 0 = skip")
    safety_fraction: float = Field(default=0.3, ge=0, le=1, description="share of safety-family prompts")


TRAINED_ROLES = ("policy", "critic")  # trained under DeepSpeed: ZeRO-3 groups with an optimizer
FROZEN_ROLES = ("reference", "helpful", "safety")  # forward only: one actor, or a ZeRO-3 inference group


class RoleResources(BaseModel):
    """One placement-group bundle per rank. Every role is one rank unless `ranks` names it: the
    policy and critic then train as one ZeRO-3 group over their ranks; a frozen role (reference,
    reward models) becomes a ZeRO-3 inference group, its bf16 weights split over the ranks (a 70B
    model's 138 GB do not fit one GPU). 0.5 CPU a bundle lets the five PPO roles share a 2-core
    machine (they mostly wait on one another); on a cluster give each bundle one GPU."""

    model_config = ConfigDict(extra="forbid")

    cpus_per_role: float = Field(default=0.5, gt=0, description="CPUs of each bundle (one rank of a role)")
    gpus_per_role: float = Field(default=0, ge=0, description="GPUs of each bundle (one rank of a role)")
    ranks: dict[str, int] = Field(default={}, description="ranks of a role's ZeRO-3 group (e.g. {policy: 8, "
                                  "critic: 8, reference: 2}); a role not named is one actor")
    accelerator_type: str | None = None
    strategy: str = Field(default="PACK", pattern="^(PACK|SPREAD|STRICT_PACK|STRICT_SPREAD)$",
                          description="PACK: one machine if it fits, else spread over several")
    call_timeout_s: float = Field(default=3600, gt=0, description="a role call that takes longer fails the step")

    @model_validator(mode="after")
    def _check_ranks(self) -> "RoleResources":
        for role, n in self.ranks.items():
            if role not in TRAINED_ROLES + FROZEN_ROLES:
                raise ValueError(f"resources.ranks: {role!r} is not a role; the roles are "
                                 f"{', '.join(TRAINED_ROLES + FROZEN_ROLES)}")
            if n < 1:
                raise ValueError(f"resources.ranks.{role}: {n} ranks; give at least 1")
        return self

    def ranks_of(self, role: str) -> int:
        return self.ranks.get(role, 1)

    def group_of(self, role: str) -> int | None:
        """A frozen role's ranks if `ranks` names it (a ZeRO-3 inference group), else None (one actor)."""
        return self.ranks.get(role)


class RolloutConfig(BaseModel):
    """Where the policy's samples come from (`corral.rlhf.generators`).

    `corral`: the policy role gathers its ZeRO-3 shards into a plain model once per rollout phase
    and decodes with corral's engine in its own process (the CPU default: nothing else to start).
    `vllm`: `num_engines` vLLM engines, each a Ray actor on `vllm.tensor_parallel_size` GPUs (when
    `resources.gpus_per_role` > 0), started once from the starting policy; after every policy update
    the new weights reach them in memory (`sync`), and the prompts of a rollout phase are split
    across them.
    """

    model_config = ConfigDict(extra="forbid")

    engine: Literal["corral", "vllm"] = Field(default="corral", description="rollout backend")
    num_engines: int = Field(default=1, ge=1, description="vLLM engines; a rollout phase splits its prompts over them")
    cpus_per_engine: float = Field(default=1, gt=0, description="CPUs reserved for each engine actor")
    max_batch_size: int = Field(default=64, ge=1, description="sequences one engine decodes together (vLLM's "
                                "max_num_seqs); the rest of its shard waits")
    sync: Literal["auto", "broadcast", "object_store"] = Field(
        default="auto", description="how new weights reach the engines: `broadcast` = a torch.distributed group "
        "between policy rank 0 and every engine worker (NCCL on GPUs, gloo on CPUs); `object_store` = Ray's "
        "object store, one layer at a time; auto = broadcast on GPUs, object_store on CPUs")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="bfloat16", description="the engines' "
                                                             "weights; float32 makes greedy rollouts match corral's")
    vllm: VllmArgs = VllmArgs()


class RLStepConfig(BaseModel):
    """What both RLHF steps share: the models, the prompts, the reward gate, sampling, resources."""

    model_config = ConfigDict(extra="forbid")

    policy: str | None = Field(default=None, description="starting policy checkpoint; None = the `model` input")
    helpful_reward: str | None = Field(default=None, description="path or upstream step id; None = the "
                                       "`helpfulness_reward_model` input")
    safety_reward: str | None = Field(default=None, description="path or upstream step id; None = the "
                                      "`safety_reward_model` input")
    prompts: PromptsConfig = PromptsConfig()
    safety_threshold: float = Field(default=0.15, gt=0, lt=1, description="R_safety below this decides (paper)")
    max_new_tokens: int = Field(default=128, ge=1)
    output_dir: str | None = Field(default=None, description="checkpoints and the final policy; None = the "
                                   "pipeline's step directory")
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    resources: RoleResources = RoleResources()
    rollout: RolloutConfig = RolloutConfig()
    tracking: TrackingConfig = TrackingConfig()
    seed: int = 0


class RejectionSamplingConfig(RLStepConfig):
    """Best-of-K rejection sampling fine-tuning, several rounds, best of all rounds kept."""

    rounds: int = Field(default=1, ge=1)
    samples_per_prompt: int = Field(default=4, ge=1, description="K")
    temperature: float = Field(default=1.2, gt=0, le=2, description="paper: 1.2-1.3 for RLHF models")
    epochs: int = Field(default=2, ge=1, description="SFT epochs over the kept answers per round")
    micro_batch_size: int = Field(default=8, ge=1)
    seq_len: int = Field(default=256, ge=8, description="packed SFT rows")
    optim: OptimConfig = OptimConfig(lr=2e-5, warmup_steps=0, schedule="constant")  # the SFT LR, no schedule
    save_every: int = Field(default=1, ge=1, description="rounds between resumable state saves")

    @model_validator(mode="after")
    def _check_batches(self) -> "RejectionSamplingConfig":
        if self.micro_batch_size < self.resources.ranks_of("policy"):
            raise ValueError(f"micro_batch_size ({self.micro_batch_size}) is below the policy's ranks "
                             f"({self.resources.ranks_of('policy')}): every rank needs a row of each step")
        return self


class PtxConfig(BaseModel):
    """PPO-ptx (InstructGPT, Ouyang et al. 2022, eq. 2): every policy step adds `coef` times the SFT
    loss on a few demonstration rows, so RL does not trade away what SFT taught. Llama 2 does not
    use it (coef 0, the default); a tiny policy needs it, see the tiny spec."""

    model_config = ConfigDict(extra="forbid")

    coef: float = Field(default=0.0, ge=0, description="weight of the SFT loss in the policy loss; 0 = off")
    data: list[str] = Field(default=[], description="SFT JSONL/Parquet files; empty = the task suite")
    tasks: TaskSuiteConfig = TaskSuiteConfig(train_size=4000)
    rows_per_step: int = Field(default=4, ge=1, description="packed SFT rows beside each policy minibatch")
    seq_len: int = Field(default=256, ge=8, description="packed SFT row length")


class PPOConfig(RLStepConfig):
    """PPO with the Llama 2 reward: WHITEN(LOGIT(R_c)) - beta * KL(pi || pi_ref) per token."""

    iterations: int = Field(default=200, ge=1, description="paper: 200-400")
    rollout_batch_size: int = Field(default=512, ge=1, description="prompts per iteration (paper: 512)")
    minibatch_size: int = Field(default=64, ge=1, description="one gradient step each (paper: 64)")
    ppo_epochs: int = Field(default=1, ge=1, description="passes over a rollout batch")
    temperature: float = Field(default=1.0, gt=0, le=2)
    beta: float | None = Field(default=None, ge=0, description="KL penalty; None = 0.01 below 30B params, else 0.005")
    clip: float = Field(default=0.2, gt=0)
    value_clip: float = Field(default=0.2, gt=0)
    gamma: float = Field(default=1.0, ge=0, le=1)
    lam: float = Field(default=0.95, ge=0, le=1)
    max_kl: float = Field(default=10.0, gt=0, description="stop when mean KL per response (nats) passes this")
    critic_warmup: int = Field(default=0, ge=0, description="first iterations train only the critic (OpenRLHF's "
                               "freezing_actor_steps): a critic fresh from the reward model predicts rewards, not "
                               "returns, and its early advantages are noise")
    save_every: int = Field(default=10, ge=1, description="iterations between policy checkpoints and resumable "
                            "state saves (policy, critic, optimizers, iteration, RNG)")
    samples_every: int = Field(default=10, ge=1, description="iterations between MLflow sample tables")
    sample_rows: int = Field(default=8, ge=1)
    optim: OptimConfig = OptimConfig(lr=1e-6, warmup_steps=0, schedule="constant")  # paper: constant 1e-6
    critic_optim: OptimConfig = OptimConfig(lr=5e-6, warmup_steps=0, schedule="constant")  # not in the paper
    ptx: PtxConfig = PtxConfig()

    @model_validator(mode="after")
    def _check_batches(self) -> "PPOConfig":
        if self.minibatch_size > self.rollout_batch_size:
            raise ValueError(f"minibatch_size ({self.minibatch_size}) exceeds rollout_batch_size "
                             f"({self.rollout_batch_size})")
        ranks = max(self.resources.ranks_of(r) for r in TRAINED_ROLES)
        if self.minibatch_size < ranks:
            raise ValueError(f"minibatch_size ({self.minibatch_size}) is below resources.ranks ({ranks}): every "
                             f"rank needs a sequence of each minibatch")
        if self.ptx.coef > 0 and self.ptx.rows_per_step < self.resources.ranks_of("policy"):
            raise ValueError(f"ptx.rows_per_step ({self.ptx.rows_per_step}) is below the policy's ranks "
                             f"({self.resources.ranks_of('policy')}): every rank needs a row of each step")
        return self

    def beta_for(self, model: ModelConfig) -> float:
        """The paper's beta: 0.01 for 7B/13B, 0.005 for 34B/70B; tiny and small take 0.01 too."""
        if self.beta is not None:
            return self.beta
        return 0.005 if model.num_params() > 30e9 else 0.01
