"""The RLHF roles as Ray actors, one class per role, and the group that places them.

- `PolicyActor`: the policy, trained with the DeepSpeed strategy (ZeRO-3 by default). It samples
  through the shared engine: once per rollout phase its ZeRO-3 shards are gathered into a plain
  `Transformer` that the engine runs, so no per-token gathering happens during decoding. With
  `rollout.engine: vllm` it samples nothing itself: after each update it pushes its weights to the
  vLLM engines (`push_weights`, `corral.rlhf.generators`).
- `CriticActor`: the value model, initialised from the helpfulness reward model, trained.
- `ReferenceActor`: the frozen starting policy, for the KL penalty.
- `RewardActor`: a frozen reward model (two instances: helpfulness and safety).
- `RoleGroup`: owns one placement group with a bundle per role (OpenRLHF's launcher pattern), so the
  roles share one small machine here (`PACK`) or spread over GPU nodes on a cluster. Every call goes
  through it, and a role that raises or dies fails the step with the role's name, never a hang.

Each trained role is a DeepSpeed world of one process here. Scaling a role to N ranks means N
actors of its class in the group joined in one process group; that is not built yet.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from functools import partial

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from corral.checkpoint import WeightReader, load_model, load_tokenizer, read_config, save_model
from corral.config import DeepSpeedConfig, OptimConfig
from corral.engine import Engine, SamplingParams
from corral.model import Transformer, WeightSource
from corral.reward import RewardModel, load_reward_model, reward_checkpoint
from corral.rlhf.generators import free_port, push_weights, sync_group
from corral.rlhf.config import RoleResources
from corral.rlhf.objectives import entropy, gather_logprobs
from corral.train.losses import approx_kl, policy_loss, sft_loss, value_loss
from corral.train.strategy import DeepSpeedStrategy


class RoleFailed(RuntimeError):
    """A role actor raised or died; names the role and what it was doing."""


def _own_process_group() -> None:
    """Each trained role is its own DeepSpeed world of one: give it a free rendezvous port, so
    two roles (or a training run beside them) on one host never collide on MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


class _Role:
    def ready(self) -> dict:
        """Where this role runs (the placement test reads it)."""
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}


def _strategy(make_model: Callable[[], torch.nn.Module], weights: Callable[[], WeightSource], ds: DeepSpeedConfig,
              optim: OptimConfig, micro_batch_size: int) -> DeepSpeedStrategy:
    """A trained role's model, built and filled by the strategy (under ZeRO-3: born partitioned)."""
    _own_process_group()
    # max_steps only shapes a cosine schedule; RLHF runs a constant LR
    strategy = DeepSpeedStrategy(ds, optim, micro_batch_size=micro_batch_size, max_steps=1 << 30)
    strategy.prepare(strategy.build(make_model, weights))
    return strategy


@ray.remote
class PolicyActor(_Role):
    """The policy: samples through the shared engine, trains with PPO or the SFT loss under DeepSpeed."""

    def __init__(self, path: str, ds: DeepSpeedConfig, optim: OptimConfig, micro_batch_size: int):
        torch.manual_seed(0)
        config = read_config(path)
        self.tokenizer = load_tokenizer(path)
        self.strategy = _strategy(partial(Transformer, config), partial(WeightReader, path), ds, optim,
                                  micro_batch_size)
        self.config, self._sampler = config, None

    @property
    def sampler(self) -> Transformer:
        """The plain copy corral's engine runs (refreshed per phase), built on first use: with vLLM
        rollouts only `save` needs it."""
        if self._sampler is None:
            self._sampler = Transformer(self.config).eval()
        return self._sampler

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        """Completion ids for every prompt. Gathers the ZeRO-3 shards once, then decodes without DeepSpeed."""
        self.sampler.load_state_dict(self.strategy.full_state_dict())  # one all-gather per rollout phase
        longest = max(len(p) for p in prompts) + params.max_tokens
        engine = Engine(self.sampler, self.tokenizer, max_batch_size=min(len(prompts), 64), max_seq_len=longest)
        return engine.generate(prompts, params)

    @torch.no_grad()
    def logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        """log pi(token t+1 | tokens <= t) under the training weights: (bsz, L) -> (bsz, L-1)."""
        self.strategy.train(False)
        return gather_logprobs(self.strategy.forward(tokens), tokens).cpu()

    def train_ppo(self, batch: dict[str, torch.Tensor], clip: float, ptx: dict | None = None,
                  ptx_coef: float = 0.0) -> dict[str, float]:
        """One gradient step of the clipped surrogate on one minibatch, plus `ptx_coef` times the
        SFT loss on the packed rows `ptx` when given (PPO-ptx)."""
        self.strategy.train(True)
        logits = self.strategy.forward(batch["tokens"])  # (bsz, L, vocab)
        logprobs = gather_logprobs(logits, batch["tokens"])
        mask = batch["mask"]
        loss, clip_fraction = policy_loss(logprobs, batch["logprobs"], batch["advantages"], mask, clip)
        stats = {"policy_loss": loss.item()}
        if ptx is not None:
            ptx_loss, _ = sft_loss(self.strategy.forward, ptx)
            stats["ptx_loss"] = ptx_loss.item()
            loss = loss + ptx_coef * ptx_loss
        self.strategy.backward(loss)
        self.strategy.step()
        with torch.no_grad():
            return stats | {"clip_fraction": clip_fraction.item(),
                            "approx_kl": approx_kl(logprobs, batch["logprobs"], mask).item(),
                            "entropy": entropy(logits[:, :-1], mask).item(), "grad_norm": self.strategy.grad_norm()}

    def train_sft(self, batch: dict) -> float:
        """One gradient step of the SFT loss (answer tokens only) on packed rows (`corral.data.sft.pack`)."""
        self.strategy.train(True)
        loss, _ = sft_loss(self.strategy.forward, batch)
        self.strategy.backward(loss)
        self.strategy.step()
        return loss.item()

    def sync_address(self) -> tuple[str, int]:
        """Where the weight-sync group's store will listen: this rank (rank 0) hosts it."""
        return ray.util.get_node_ip_address(), free_port()

    def join_sync_group(self, host: str, port: int, world_size: int, backend: str) -> None:
        """Rank 0 of the broadcast group with the vLLM engines' workers (`corral.rlhf.generators`)."""
        self.sync_group = sync_group(host, port, 0, world_size, backend)

    def push_weights(self, engines: list, transport: str) -> dict:
        """The current weights into the vLLM engines, gathered from ZeRO-3 one layer at a time, no file
        written. Collective like `gathered_parameters`: every rank calls it, rank 0 sends."""
        return push_weights(self.strategy.gathered_parameters(), self.config, engines, transport,
                            getattr(self, "sync_group", None))

    def save(self, out_dir: str, metadata: dict) -> str:
        """The policy in corral's format (`corral.load_model`, `corral export hf`)."""
        self.sampler.load_state_dict(self.strategy.full_state_dict())
        return str(save_model(self.sampler, out_dir, tokenizer=self.tokenizer, metadata=metadata))


class Critic(RewardModel):
    """The reward model's network read at every position: V(state t) for each token (bsz, L)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return Transformer.forward(self, tokens)[..., 0]  # (bsz, L)


@ray.remote
class CriticActor(_Role):
    """The value model: starts as the helpfulness reward model, trained on the PPO returns."""

    def __init__(self, reward_path: str, ds: DeepSpeedConfig, optim: OptimConfig, micro_batch_size: int):
        config = read_config(reward_path)
        self.strategy = _strategy(partial(Critic, config), partial(reward_checkpoint, reward_path), ds, optim,
                                  micro_batch_size)

    @torch.no_grad()
    def values(self, tokens: torch.Tensor) -> torch.Tensor:
        """V at label positions: (bsz, L) -> (bsz, L-1), the value before each next token."""
        self.strategy.train(False)
        return self.strategy.forward(tokens)[:, :-1].float().cpu()

    def train_values(self, batch: dict[str, torch.Tensor], clip: float) -> dict[str, float]:
        self.strategy.train(True)
        values = self.strategy.forward(batch["tokens"])[:, :-1].float()
        loss = value_loss(values, batch["values"], batch["returns"], batch["mask"], clip)
        self.strategy.backward(loss)
        self.strategy.step()
        return {"value_loss": loss.item()}


@ray.remote
class ReferenceActor(_Role):
    """The frozen starting policy pi_ref of the KL penalty."""

    def __init__(self, path: str, bf16: bool):
        # the policy's numerics (DeepSpeed bf16): KL is exactly 0 before the first update
        self.model = load_model(path, dtype=torch.bfloat16 if bf16 else torch.float32).eval()

    @torch.no_grad()
    def logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        return gather_logprobs(self.model(tokens), tokens)


@ray.remote
class RewardActor(_Role):
    """A frozen reward model; scores finished dialogs as sigmoid probabilities."""

    def __init__(self, path: str):
        self.model = load_reward_model(path)

    def score(self, dialogs: Sequence[Sequence[dict]]) -> torch.Tensor:
        return torch.sigmoid(torch.tensor(self.model.score_batch(dialogs)))


class RoleGroup:
    """One placement group, one bundle per role, one actor per bundle.

    `roles` maps a role name to (actor class, constructor args). Construction waits until every
    role is up; a role whose constructor raises fails it with the role's name.
    """

    def __init__(self, roles: dict[str, tuple], resources: RoleResources, what: str = "RLHF"):
        self.what, self.timeout = what, resources.call_timeout_s
        bundle = {"CPU": resources.cpus_per_role}
        if resources.gpus_per_role:
            bundle["GPU"] = resources.gpus_per_role
        if resources.accelerator_type:
            bundle[f"accelerator_type:{resources.accelerator_type}"] = 0.001
        self.pg = placement_group([dict(bundle) for _ in roles], strategy=resources.strategy, name=f"corral-{what}")
        try:
            ray.get(self.pg.ready(), timeout=self.timeout)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            raise RoleFailed(f"{what}: the cluster cannot place {len(roles)} roles of {bundle} each "
                             f"within {self.timeout:.0f}s; lower resources.cpus_per_role/gpus_per_role "
                             f"or add nodes") from None
        self.actors = {}
        for i, (name, (cls, args)) in enumerate(roles.items()):
            self.actors[name] = cls.options(
                num_cpus=resources.cpus_per_role, num_gpus=resources.gpus_per_role, name=None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(*args)
        try:
            self.where = self.get({name: a.ready.remote() for name, a in self.actors.items()}, "starting")
        except BaseException:
            self.shutdown()
            raise

    def __getitem__(self, role: str):
        return self.actors[role]

    def get(self, refs: dict, doing: str) -> dict:
        """Wait for one call per role; the first failure raises `RoleFailed` naming the role."""
        out = {}
        for role, ref in refs.items():
            try:
                out[role] = ray.get(ref, timeout=self.timeout)
            except ray.exceptions.GetTimeoutError:
                raise RoleFailed(f"{self.what} role {role!r} did not finish {doing} within {self.timeout:.0f}s "
                                 f"(resources.call_timeout_s)") from None
            except ray.exceptions.RayActorError as e:
                state = "could not start" if e.actor_init_failed else f"died while {doing}"
                raise RoleFailed(f"{self.what} role {role!r} {state}: {_last_line(e)}") from e
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if getattr(e, "cause", None) is not None else e
                raise RoleFailed(f"{self.what} role {role!r} failed while {doing}: "
                                 f"{type(cause).__name__}: {_last_line(cause)}") from e
            except ray.exceptions.RayError as e:  # out of memory, object lost, ...
                raise RoleFailed(f"{self.what} role {role!r} failed while {doing}: "
                                 f"{type(e).__name__}: {str(e).strip().splitlines()[0]}") from e
        return out

    def call(self, role: str, method: str, *args, doing: str | None = None):
        """One method call on one role, waited for."""
        ref = getattr(self.actors[role], method).remote(*args)
        return self.get({role: ref}, doing or method)[role]

    def shutdown(self) -> None:
        for actor in self.actors.values():
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.pg)


def _last_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__
