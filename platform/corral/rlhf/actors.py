"""The RLHF roles as Ray actors, one class per role, and the group that places them.

- `PolicyActor`: the policy, trained with the DeepSpeed strategy (ZeRO-3 by default). It samples
  through the shared engine: once per rollout phase its ZeRO-3 shards are gathered into a plain
  `Transformer` that the engine runs (on rank 0), so no per-token gathering happens during decoding.
  With `rollout.engine: vllm` it samples nothing itself: after each update it pushes its weights to
  the vLLM engines (`push_weights`, `corral.rlhf.generators`).
- `CriticActor`: the value model, initialised from the helpfulness reward model, trained.
- `ReferenceActor`: the frozen starting policy, for the KL penalty.
- `RewardActor`: a frozen reward model (two instances: helpfulness and safety).
- `RoleGroup`: owns one placement group with a bundle per rank (OpenRLHF's launcher pattern), so the
  roles share one small machine here (`PACK`) or spread over GPU nodes on a cluster. Every call goes
  through it, and a role that raises or dies fails the step with the role's name, never a hang.

The policy and critic are N-rank groups (`resources.ranks`): one actor per rank, one
`torch.distributed` group per role (gloo on CPU, NCCL on GPU) whose rendezvous address is chosen
once, on rank 0's node, and handed to every rank; ZeRO-3 shards the model over the group. Every
rank runs every call (a ZeRO-3 forward is collective): training calls give each rank its slice of
the minibatch, weighted so the group's step equals one step on the whole minibatch; scoring and
sampling calls give every rank the same input, and rank 0's result is the group's.

Every role runs on its own device (its GPU when Ray gave it one, else the CPU): each role method
moves what it receives there with `_Role.local` and returns results on the CPU.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from corral.checkpoint import WeightReader, load_model, load_tokenizer, read_config, save_model
from corral.config import DeepSpeedConfig, OptimConfig
from corral.engine import Engine, SamplingParams
from corral.model import Transformer, WeightSource
from corral.placement import bundle, reserve
from corral.reward import RewardModel, load_reward_model, reward_checkpoint
from corral.rlhf.generators import free_port, push_weights, sync_group
from corral.rlhf.config import RoleResources
from corral.rlhf.objectives import entropy, gather_logprobs
from corral.train.losses import approx_kl, policy_loss, sft_loss, value_loss
from corral.train.strategy import DeepSpeedStrategy, saved_world_size


class RoleFailed(RuntimeError):
    """A role actor raised or died; names the role and what it was doing."""


@dataclass(frozen=True)
class World:
    """One rank's place in its role's process group: the rendezvous rank 0 chose, and its index."""

    rank: int
    size: int
    master_addr: str
    master_port: int

    def join(self) -> None:
        """The environment DeepSpeed's `init_distributed` reads. LOCAL_RANK is 0: Ray shows each
        rank only its own GPU (CUDA_VISIBLE_DEVICES), so that GPU is cuda:0 in every rank."""
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.size), LOCAL_RANK="0",
                          MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))


@ray.remote(num_cpus=0)
def _rendezvous() -> tuple[str, int]:
    """A free port on this node, run in rank 0's bundle: the address every rank of a role joins.
    (Bound and released here, taken by rank 0's gloo/NCCL store moments later.)"""
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def to_device(obj: Any, device: torch.device) -> Any:
    """Every tensor in `obj` (nested dicts, lists, tuples) moved to `device`; other values as they are."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def role_device() -> torch.device:
    """The GPU Ray assigned this actor (cuda:0 under its CUDA_VISIBLE_DEVICES), else the CPU."""
    return torch.device("cuda", 0) if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")


class _Role:
    device = torch.device("cpu")
    world: World | None = None

    def ready(self) -> dict:
        """Where this role runs (the placement test reads it)."""
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "device": str(self.device),
                "rank": self.world.rank if self.world else 0}

    def local(self, obj: Any) -> Any:
        """What the driver sent, on this role's device: every role method's inputs pass through here."""
        return to_device(obj, self.device)

    def watch_inputs(self, model: torch.nn.Module) -> None:
        """Record the devices of the tensors `model`'s forward receives (`inputs_seen`, for the tests)."""
        self.seen: set[str] = set()

        def record(_module, args, kwargs):
            self.seen.update(str(a.device) for a in (*args, *kwargs.values()) if torch.is_tensor(a))

        model.register_forward_pre_hook(record, with_kwargs=True)

    def parameters_held(self) -> int:
        """Parameter elements this rank holds: its ZeRO-3 partitions, or the whole model."""
        model = self.model if hasattr(self, "model") else self.strategy.engine.module
        return sum(getattr(p, "ds_tensor", p).numel() for p in model.parameters())

    def inputs_seen(self) -> dict:
        """This role's device and the devices its model's forward has received tensors on."""
        return {"device": str(self.device), "seen": sorted(self.seen)}


class _Trained(_Role):
    """A role trained under DeepSpeed, one rank of its group: state saves and loads are collective."""

    def ready(self) -> dict:
        """Where this rank runs, and the dtype its ZeRO-3 partitions hold (the training dtype)."""
        return super().ready() | {"dtype": str(next(self.strategy.engine.module.parameters()).dtype)}

    def save_state(self, directory: str, client_state: dict) -> None:
        """This rank's shard of model, optimizer and scheduler, and its RNG (`DeepSpeedStrategy.save`)."""
        self.strategy.save(directory, client_state)

    def load_state(self, directory: str) -> dict:
        """Restore what `save_state` wrote; the group must have as many ranks as the one that saved."""
        saved = saved_world_size(directory)
        if saved != self.strategy.world_size:
            raise ValueError(f"the state in {directory} was saved by {saved} ranks, this group has "
                             f"{self.strategy.world_size}: resume with the same resources.ranks, or delete "
                             f"{Path(directory).parent} to start over")
        return self.strategy.load(directory)

    def group_mean(self, value: torch.Tensor | float) -> float:
        """The mean over the group's ranks of a (weighted) per-rank statistic. Collective."""
        return self.strategy.all_reduce_mean(torch.as_tensor(value)).item()


def _strategy(world: World, make_model: Callable[[], torch.nn.Module], weights: Callable[[], WeightSource],
              ds: DeepSpeedConfig, optim: OptimConfig, micro_batch_size: int) -> DeepSpeedStrategy:
    """A trained role's model, built and filled by the strategy (under ZeRO-3: born partitioned
    over the role's ranks)."""
    world.join()
    # max_steps only shapes a cosine schedule; RLHF runs a constant LR
    strategy = DeepSpeedStrategy(ds, optim, micro_batch_size=micro_batch_size, max_steps=1 << 30)
    strategy.prepare(strategy.build(make_model, weights))
    return strategy


@ray.remote
class PolicyActor(_Trained):
    """The policy, one rank of its group: samples through the shared engine (rank 0), trains with PPO
    or the SFT loss under DeepSpeed (every rank, on its slice of each minibatch)."""

    def __init__(self, path: str, ds: DeepSpeedConfig, optim: OptimConfig, micro_batch_size: int, *, world: World):
        torch.manual_seed(0)
        config = read_config(path)
        self.tokenizer = load_tokenizer(path)
        self.world = world
        self.strategy = _strategy(world, partial(Transformer, config), partial(WeightReader, path), ds, optim,
                                  micro_batch_size)
        self.config, self._sampler = config, None
        self.device = self.strategy.device
        self.watch_inputs(self.strategy.engine.module)

    @property
    def sampler(self) -> Transformer | None:
        """The plain copy corral's engine runs (refreshed per phase) on rank 0, which decodes; None on
        the other ranks. Built on first use: with vLLM rollouts only `save` needs it."""
        if self.world.rank != 0:
            return None
        if self._sampler is None:
            self._sampler = Transformer(self.config).eval().to(self.device)
        return self._sampler

    def _gather_sampler(self) -> bool:
        """Gather the ZeRO-3 shards into rank 0's sampler (collective: every rank drains it); True on rank 0."""
        state = self.strategy.full_state_dict()
        if self.sampler is None:
            return False
        self.sampler.load_state_dict(state)
        return True

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]] | None:
        """Completion ids for every prompt (rank 0; None on the other ranks). Gathers the ZeRO-3 shards
        once, then decodes without DeepSpeed."""
        if not self._gather_sampler():  # one all-gather per rollout phase
            return None
        longest = max(len(p) for p in prompts) + params.max_tokens
        engine = Engine(self.sampler, self.tokenizer, max_batch_size=min(len(prompts), 64), max_seq_len=longest)
        return engine.generate(prompts, params)

    @torch.no_grad()
    def logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        """log pi(token t+1 | tokens <= t) under the training weights: (bsz, L) -> (bsz, L-1)."""
        self.strategy.train(False)
        tokens = self.local(tokens)
        return gather_logprobs(self.strategy.forward(tokens), tokens).cpu()

    def train_ppo(self, batch: dict[str, torch.Tensor], clip: float, ptx: dict | None = None,
                  ptx_coef: float = 0.0, weight: float = 1.0, ptx_weight: float = 1.0) -> dict[str, float]:
        """One gradient step of the clipped surrogate on one minibatch, plus `ptx_coef` times the SFT
        loss on the packed rows `ptx` when given (PPO-ptx).

        In a group each rank has its slice of the minibatch; `weight` (`ptx_weight`) is ranks times
        this slice's share of the minibatch's response (answer) tokens, so the group's averaged
        gradient and the returned statistics are those of the token mean over the whole minibatch.
        """
        self.strategy.train(True)
        batch, ptx = self.local(batch), self.local(ptx)
        logits = self.strategy.forward(batch["tokens"])  # (bsz, L, vocab)
        logprobs = gather_logprobs(logits, batch["tokens"])
        mask = batch["mask"]
        loss, clip_fraction = policy_loss(logprobs, batch["logprobs"], batch["advantages"], mask, clip)
        stats = {"policy_loss": weight * loss.detach()}
        loss = weight * loss
        if ptx is not None:
            ptx_loss, _ = sft_loss(self.strategy.forward, ptx)
            stats["ptx_loss"] = ptx_weight * ptx_loss.detach()
            loss = loss + ptx_coef * ptx_weight * ptx_loss
        self.strategy.backward(loss)
        self.strategy.step()
        with torch.no_grad():
            stats |= {"clip_fraction": weight * clip_fraction,
                      "approx_kl": weight * approx_kl(logprobs, batch["logprobs"], mask),
                      "entropy": weight * entropy(logits[:, :-1], mask)}
            return {k: self.group_mean(v) for k, v in stats.items()} | {"grad_norm": self.strategy.grad_norm()}

    def train_sft(self, batch: dict, weight: float = 1.0) -> float:
        """One gradient step of the SFT loss (answer tokens only) on packed rows (`corral.data.sft.pack`);
        `weight` as in `train_ppo`, over answer tokens."""
        self.strategy.train(True)
        loss, _ = sft_loss(self.strategy.forward, self.local(batch))
        self.strategy.backward(weight * loss)
        self.strategy.step()
        return self.group_mean(weight * loss.detach())

    def sync_address(self) -> tuple[str, int]:
        """Where the weight-sync group's store will listen: rank 0 hosts it."""
        return ray.util.get_node_ip_address(), free_port()

    def join_sync_group(self, host: str, port: int, world_size: int, backend: str) -> None:
        """Rank 0 of the broadcast group with the vLLM engines' workers (`corral.rlhf.generators`);
        call it on rank 0 only."""
        self.sync_group = sync_group(host, port, 0, world_size, backend)

    def push_weights(self, engines: list, transport: str) -> dict:
        """The current weights into the vLLM engines, gathered from ZeRO-3 one layer at a time, no file
        written. Collective like `gathered_parameters`: every rank calls it, rank 0 sends."""
        return push_weights(self.strategy.gathered_parameters(), self.config, engines, transport,
                            getattr(self, "sync_group", None))

    def save(self, out_dir: str, metadata: dict) -> str | None:
        """The policy in corral's format (`corral.load_model`, `corral export hf`), written by rank 0."""
        if not self._gather_sampler():
            return None
        return str(save_model(self.sampler, out_dir, tokenizer=self.tokenizer, metadata=metadata))


class Critic(RewardModel):
    """The reward model's network read at every position: V(state t) for each token (bsz, L)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return Transformer.forward(self, tokens)[..., 0]  # (bsz, L)


@ray.remote
class CriticActor(_Trained):
    """The value model, one rank of its group: starts as the helpfulness reward model, trained on the
    PPO returns."""

    def __init__(self, reward_path: str, ds: DeepSpeedConfig, optim: OptimConfig, micro_batch_size: int, *,
                 world: World):
        config = read_config(reward_path)
        self.world = world
        self.strategy = _strategy(world, partial(Critic, config), partial(reward_checkpoint, reward_path), ds, optim,
                                  micro_batch_size)
        self.device = self.strategy.device
        self.watch_inputs(self.strategy.engine.module)

    @torch.no_grad()
    def values(self, tokens: torch.Tensor) -> torch.Tensor:
        """V at label positions: (bsz, L) -> (bsz, L-1), the value before each next token."""
        self.strategy.train(False)
        return self.strategy.forward(self.local(tokens))[:, :-1].float().cpu()

    def train_values(self, batch: dict[str, torch.Tensor], clip: float, weight: float = 1.0) -> dict[str, float]:
        """One gradient step of the clipped value loss; `weight` as in `PolicyActor.train_ppo`."""
        self.strategy.train(True)
        batch = self.local(batch)
        values = self.strategy.forward(batch["tokens"])[:, :-1].float()
        loss = weight * value_loss(values, batch["values"], batch["returns"], batch["mask"], clip)
        self.strategy.backward(loss)
        self.strategy.step()
        return {"value_loss": self.group_mean(loss.detach())}


def _frozen(world: World, make_model: Callable[[], torch.nn.Module], weights: Callable[[], WeightSource],
            bf16: bool) -> DeepSpeedStrategy:
    """A frozen role's model as one rank of a ZeRO-3 inference group: born partitioned over the
    role's ranks, each filling its own share from the checkpoint; no optimizer."""
    world.join()
    strategy = DeepSpeedStrategy(DeepSpeedConfig(zero_stage=3, bf16=bf16), OptimConfig(), micro_batch_size=1,
                                 max_steps=1)
    strategy.prepare_frozen(strategy.build(make_model, weights))
    return strategy


@ray.remote
class ReferenceActor(_Role):
    """The frozen starting policy pi_ref of the KL penalty, on the role's device: one actor, or with
    `world` one rank of a ZeRO-3 inference group (every rank runs every forward, rank 0 answers)."""

    def __init__(self, path: str, bf16: bool, *, world: World | None = None):
        # the policy's numerics (DeepSpeed bf16): KL is exactly 0 before the first update
        if world is None:
            self.device = role_device()
            self.model = self.forward = load_model(path, dtype=torch.bfloat16 if bf16 else torch.float32
                                                   ).eval().to(self.device)
        else:
            self.world = world
            strategy = _frozen(world, partial(Transformer, read_config(path)), partial(WeightReader, path), bf16)
            self.device, self.model, self.forward = strategy.device, strategy.engine.module, strategy.forward
        self.watch_inputs(self.model)

    @torch.no_grad()
    def logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = self.local(tokens)
        return gather_logprobs(self.forward(tokens), tokens).cpu()


@ray.remote
class RewardActor(_Role):
    """A frozen reward model on the role's device; scores finished dialogs as sigmoid probabilities.
    One actor (fp32), or with `world` one rank of a ZeRO-3 inference group (in bf16 when `bf16`)."""

    def __init__(self, path: str, bf16: bool = False, *, world: World | None = None):
        if world is None:
            self.device = role_device()
            self.model = load_reward_model(path).to(self.device)
        else:
            self.world = world
            strategy = _frozen(world, partial(RewardModel, read_config(path)), partial(reward_checkpoint, path), bf16)
            # ZeRO-3's gathering hooks sit on the module itself: `score_batch` calls it directly
            self.device, self.model = strategy.device, strategy.engine.module
            self.model.tokenizer = load_tokenizer(path)
        self.watch_inputs(self.model)

    @torch.no_grad()
    def score(self, dialogs: Sequence[Sequence[dict]]) -> torch.Tensor:
        # the dialogs are text: the model tokenizes them onto its own device (RewardModel.score_batch)
        return torch.sigmoid(torch.tensor(self.model.score_batch(dialogs)))


def shard_rows(batch: dict[str, torch.Tensor], ranks: int, tokens: torch.Tensor) -> list[tuple[dict, float]]:
    """`batch`'s rows in `ranks` contiguous slices, each with its weight: `ranks` times the slice's
    share of the batch's tokens (`tokens`: the tokens each row's loss averages over).

    A rank's loss is a token mean over its slice; weighted so, the mean of the ranks' gradients (what
    DeepSpeed's data-parallel reduction computes) is exactly the gradient of the token mean over the
    whole batch, however unevenly the tokens fall. One rank: the batch itself, weight 1.
    """
    total = tokens.sum().item()
    out = []
    for rows in torch.arange(len(tokens)).tensor_split(ranks):
        weight = ranks * tokens[rows].sum().item() / total if total > 0 else 1.0
        out.append(({k: v[rows] for k, v in batch.items()}, weight))
    return out


@dataclass(frozen=True)
class Role:
    """One role of a group: its actor class and constructor arguments; with `ranks` it is that many
    actors in one process group (a ZeRO-3 group), each given its `World` as the `world` keyword."""

    cls: Any
    args: tuple
    ranks: int | None = None  # None: one actor outside any process group


class RoleGroup:
    """One placement group, one bundle per rank, one actor per bundle.

    `roles` maps a role name to its `Role`. Construction waits until every rank of every role is
    up; a role whose constructor raises fails it with the role's name.
    """

    def __init__(self, roles: dict[str, Role], resources: RoleResources, what: str = "RLHF"):
        self.what, self.timeout = what, resources.call_timeout_s
        self.size = {name: role.ranks or 1 for name, role in roles.items()}
        n = sum(self.size.values())
        self.pg = reserve([bundle(resources.cpus_per_role, resources.gpus_per_role, resources.accelerator_type)] * n,
                          resources.strategy, self.timeout, f"{what} ({self.size} ranks)",
                          "Lower resources.cpus_per_role/gpus_per_role/ranks or add nodes.", name=f"corral-{what}")
        self.actors: dict[str, list] = {}
        first = 0
        for name, role in roles.items():
            def bundle_of(rank: int) -> PlacementGroupSchedulingStrategy:
                return PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=first + rank)

            options = dict(num_cpus=resources.cpus_per_role, num_gpus=resources.gpus_per_role, name=None)
            if role.ranks is None:
                self.actors[name] = [role.cls.options(**options, scheduling_strategy=bundle_of(0)).remote(*role.args)]
            else:
                addr, port = ray.get(_rendezvous.options(scheduling_strategy=bundle_of(0)).remote())
                self.actors[name] = [
                    role.cls.options(**options, scheduling_strategy=bundle_of(rank)).remote(
                        *role.args, world=World(rank, role.ranks, addr, port))
                    for rank in range(role.ranks)]
            first += self.size[name]
        try:
            self.placement = self.get({name: self.remote(name, "ready") for name in self.actors}, "starting",
                                      every_rank=True)
            self.where = {name: ranks[0] for name, ranks in self.placement.items()}
        except BaseException:
            self.shutdown()
            raise

    def __getitem__(self, role: str):
        """The role's rank-0 actor."""
        return self.actors[role][0]

    def remote(self, role: str, method: str, *args, shards: Sequence[tuple] | None = None, **kwargs) -> list:
        """Start one call on every rank of a role: each rank gets `args` (put in the object store once),
        or with `shards` rank i gets `shards[i] + args`. Returns one ref per rank, for `get`."""
        actors = self.actors[role]
        if shards is not None and len(shards) != len(actors):
            raise ValueError(f"{len(shards)} shards for the {len(actors)} ranks of role {role!r}")
        if shards is None and len(actors) > 1:
            args = tuple(ray.put(a) if torch.is_tensor(a) or isinstance(a, (dict, list)) else a for a in args)
        return [getattr(actor, method).remote(*(shards[i] if shards is not None else ()), *args, **kwargs)
                for i, actor in enumerate(actors)]

    def get(self, calls: dict[str, list], doing: str, every_rank: bool = False) -> dict:
        """Wait for every rank of every call; rank 0's result per role (every rank's with `every_rank`).

        The first rank that fails raises `RoleFailed` naming the role (and rank) at once: its group's
        other ranks may be waiting on it in a collective, and would only time out."""
        pending = {ref: (role, rank) for role, refs in calls.items() for rank, ref in enumerate(refs)}
        out: dict[str, dict[int, Any]] = {role: {} for role in calls}
        deadline = time.monotonic() + self.timeout
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                role, rank = next(iter(pending.values()))
                raise RoleFailed(f"{self.what} {self._name(role, rank)} did not finish {doing} within "
                                 f"{self.timeout:.0f}s (resources.call_timeout_s)")
            role, rank = pending.pop(ready[0])
            out[role][rank] = self._result(ready[0], role, rank, doing)
        if every_rank:
            return {role: [by_rank[i] for i in range(len(by_rank))] for role, by_rank in out.items()}
        return {role: by_rank[0] for role, by_rank in out.items()}

    def _name(self, role: str, rank: int) -> str:
        if role not in self.size:  # another actor waited for beside the roles (a vLLM engine)
            return role
        return f"role {role!r}" + (f" (rank {rank} of {self.size[role]})" if self.size[role] > 1 else "")

    def _result(self, ref, role: str, rank: int, doing: str):
        who = f"{self.what} {self._name(role, rank)}"
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as e:
            state = "could not start" if e.actor_init_failed else f"died while {doing}"
            raise RoleFailed(f"{who} {state}: {_last_line(e)}") from e
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            raise RoleFailed(f"{who} failed while {doing}: {type(cause).__name__}: {_last_line(cause)}") from e
        except ray.exceptions.RayError as e:  # out of memory, object lost, ...
            raise RoleFailed(f"{who} failed while {doing}: {type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0]}") from e

    def call(self, role: str, method: str, *args, doing: str | None = None):
        """One method call on every rank of one role, waited for; rank 0's result."""
        return self.get({role: self.remote(role, method, *args)}, doing or method)[role]

    def shutdown(self) -> None:
        for ranks in self.actors.values():
            for actor in ranks:
                ray.kill(actor, no_restart=True)
        remove_placement_group(self.pg)


def _last_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__
