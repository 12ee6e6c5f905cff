"""Where RLHF rollouts run (`rollout.engine` in the step's spec), and how the policy's weights get there.

- `corral` (`PolicyRollouts`): the policy role samples in its own process: once per rollout phase it
  gathers its ZeRO-3 shards into a plain model that corral's engine decodes (`PolicyActor.generate`).
  Nothing else starts; the CPU default.
- `vllm` (`VllmRollouts`): `num_engines` vLLM engines, each a Ray actor (`VllmGenerator`) holding a
  `vllm.LLM` over `tensor_parallel_size` GPUs (its own placement group; on a CPU, the CPU build of the
  same API). They start once, from a Hugging Face export of the starting policy (the only file they
  read); a rollout phase splits its prompts into one contiguous shard per engine. After every policy
  update `sync` moves the new weights into every engine without touching disk: the policy gathers its
  ZeRO-3 shards one layer at a time (`PolicyActor.push_weights`), renames and lays them out as
  Hugging Face's Llama (`corral.checkpoint.to_hf`), and each engine worker hands them to vLLM's own
  loader (`model.load_weights`, which fuses q/k/v and gate/up and slices for tensor parallelism)
  through a worker extension (`WeightLoader`) and `LLM.collective_rpc`. Two transports:
  - `broadcast`: one `torch.distributed` group joining policy rank 0 and every engine worker
    (NCCL on GPUs, gloo on CPUs), built beside the roles' own groups from a TCP store. Policy rank 0
    broadcasts each tensor once, whatever the number of engines: the GPU path, as OpenRLHF and veRL do.
  - `object_store`: each layer is put once in Ray's object store and every engine reads it. The CPU
    default: on one host it is shared memory with no second rendezvous to set up, and it needs no
    device. A layer at a time bounds the memory either path needs to one layer (plus vLLM's copy).
  With the corral backend there is nothing to sync: the policy samples with its training weights.

Colocation (vLLM `enable_sleep_mode`, engines on the policy's GPUs, sleeping through the update) is
documented in docs/training.md; it is not wired in.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Iterator, Sequence
from datetime import timedelta

import ray
import torch
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from corral.checkpoint import to_hf
from corral.config import ModelConfig
from corral.engine import SamplingParams
from corral.placement import bundle, reserve
from corral.rlhf.config import RoleResources, RolloutConfig
from corral.vllm_engine import vllm_params

SYNC_TIMEOUT = timedelta(minutes=30)  # a 70B layer over a slow link; a hang fails instead of waiting forever


def layers(named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive tensors grouped by transformer block (`layers.{i}.`); every other tensor alone."""
    chunk: list[tuple[str, torch.Tensor]] = []
    key = None
    for name, tensor in named:
        parts = name.split(".")
        this = ".".join(parts[:2]) if parts[0] == "layers" else name
        if chunk and this != key:
            yield chunk
            chunk = []
        key = this
        chunk.append((name, tensor))
    if chunk:
        yield chunk


def hf_layers(named: Iterable[tuple[str, torch.Tensor]], config: ModelConfig) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """`layers`, each tensor under its Hugging Face name and layout, as vLLM's Llama loads them."""
    for chunk in layers(named):
        yield [to_hf(name, tensor, config) for name, tensor in chunk]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def sync_group(host: str, port: int, rank: int, world_size: int, backend: str):
    """A process group of its own (not torch.distributed's default one, which the policy's DeepSpeed
    world and each vLLM engine already hold) between policy rank 0 (rank 0, which hosts the store) and
    the engine workers."""
    import torch.distributed as dist

    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=SYNC_TIMEOUT)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, SYNC_TIMEOUT)
    return dist.ProcessGroupNCCL(store, rank, world_size)


def broadcast(group, tensor: torch.Tensor) -> None:
    """Rank 0's tensor into every member's (in place)."""
    group.broadcast([tensor], _root0()).wait()


def _root0():
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    return opts


class WeightLoader:
    """vLLM worker extension (`worker_extension_cls`): vLLM mixes it into each of an engine's workers,
    and `LLM.collective_rpc(name)` calls its methods on all of them. `self.model_runner`,
    `self.vllm_config` and `self.rank` are the worker's.

    One update is a session of vLLM's layerwise reload: `start` puts the layers back in checkpoint
    format (vLLM repacks some weights for its kernels after loading, e.g. on CPUs), chunks go through
    the model's own `load_weights`, `finish` processes each layer for its kernels again.
    """

    def corral_start_weight_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.get_model())

    def corral_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        """Hugging Face-named tensors into the model, through vLLM's own loader."""
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config):
            self.model_runner.get_model().load_weights(weights=weights)
        return len(weights)

    def corral_finish_weight_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self.model_runner.get_model(), self.vllm_config.model_config)

    def corral_join_sync_group(self, host: str, port: int, rank_offset: int, world_size: int, backend: str) -> None:
        self.corral_group = sync_group(host, port, rank_offset + self.rank, world_size, backend)

    def corral_receive_weights(self, specs: list[tuple[str, str, tuple[int, ...]]]) -> int:
        """Receive one broadcast per (name, dtype, shape), in order, and load them."""
        device = "cpu" if self.device.type == "cpu" else self.device
        weights = []
        for name, dtype, shape in specs:
            tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
            broadcast(self.corral_group, tensor)
            weights.append((name, tensor))
        return self.corral_load_weights(weights)


@ray.remote
class VllmGenerator:
    """One vLLM engine (`vllm.LLM`) over `tensor_parallel_size` workers, with the weight sync."""

    def __init__(self, hf_dir: str, cfg: RolloutConfig, seed: int):
        # the engine core in this process (V1 would start a child): its workers are reached in-process
        # by collective_rpc, and one process less on a small machine
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        tp = cfg.vllm.tensor_parallel_size
        self.llm = LLM(model=hf_dir, dtype=cfg.dtype, max_num_seqs=cfg.max_batch_size, seed=seed,
                       worker_extension_cls=f"{__name__}.WeightLoader",
                       distributed_executor_backend="ray" if tp > 1 else "uni", **cfg.vllm.model_dump())
        self.tp = tp

    def ready(self) -> dict:
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(), "workers": self.tp}

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> list[list[int]]:
        """Completion ids per prompt (the stop token included when it ended the reply), as corral's engine."""
        from vllm import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
                                 [vllm_params(p, RequestOutputKind.FINAL_ONLY) for p in params], use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        self.llm.collective_rpc("corral_load_weights", args=(weights,))

    def join_sync_group(self, host: str, port: int, rank_offset: int, world_size: int, backend: str) -> None:
        self.llm.collective_rpc("corral_join_sync_group", args=(host, port, rank_offset, world_size, backend))

    def receive_weights(self, specs: list[tuple[str, str, tuple[int, ...]]]) -> None:
        self.llm.collective_rpc("corral_receive_weights", args=(specs,))

    def start_weight_update(self) -> None:
        self.llm.collective_rpc("corral_start_weight_update")

    def finish_weight_update(self) -> None:
        """After the last chunk: weights processed for the kernels, and the prefix cache dropped (its
        KV blocks were computed by the old weights)."""
        self.llm.collective_rpc("corral_finish_weight_update")
        self.llm.reset_prefix_cache()


class PolicyRollouts:
    """`rollout.engine: corral`: the policy role samples with its own training weights."""

    def __init__(self, group):
        self.group = group

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        return self.group.call("policy", "generate", prompts, params, doing="sampling")

    def sync(self) -> None:
        """Nothing to move: `PolicyActor.generate` gathers the current weights itself."""

    def shutdown(self) -> None:
        pass


class VllmRollouts:
    """`rollout.engine: vllm`: the engines, the prompt sharding and the weight sync (see the module)."""

    def __init__(self, group, hf_dir: str, cfg: RolloutConfig, resources: RoleResources, seed: int = 0):
        self.group, self.cfg = group, cfg
        gpus = cfg.vllm.tensor_parallel_size if resources.gpus_per_role else 0
        self.backend = "nccl" if gpus else "gloo"
        self.transport = cfg.sync if cfg.sync != "auto" else ("broadcast" if gpus else "object_store")
        self.pgs, self.engines = [], []
        try:
            for i in range(cfg.num_engines):
                # one bundle per GPU of the engine; its tensor-parallel Ray workers take the other bundles
                pg = reserve([bundle(cfg.cpus_per_engine, 1 if gpus else 0)] * max(1, gpus), "STRICT_PACK",
                             resources.call_timeout_s, f"vLLM engine {i}", "Lower rollout.num_engines, "
                             "rollout.cpus_per_engine or rollout.vllm.tensor_parallel_size, or add nodes.",
                             name=f"corral-vllm-{i}")
                self.pgs.append(pg)
                self.engines.append(VllmGenerator.options(
                    num_cpus=cfg.cpus_per_engine, num_gpus=1 if gpus == 1 else 0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True),
                ).remote(hf_dir, cfg, seed))
            self.where = group.get({f"vllm engine {i}": [e.ready.remote()] for i, e in enumerate(self.engines)},
                                   "starting")
            if self.transport == "broadcast":
                self.join_broadcast_group()
        except BaseException:
            self.shutdown()
            raise

    def join_broadcast_group(self) -> None:
        """Sync over a broadcast group from now on: policy rank 0 is its rank 0, then each engine's
        workers in turn."""
        self.transport = "broadcast"
        host, port = self.group.call("policy", "sync_address", doing="opening the weight-sync group")
        world = 1 + self.cfg.num_engines * self.cfg.vllm.tensor_parallel_size
        refs = {f"vllm engine {i}": [e.join_sync_group.remote(host, port, 1 + i * self.cfg.vllm.tensor_parallel_size,
                                                              world, self.backend)]
                for i, e in enumerate(self.engines)}
        refs["policy"] = [self.group["policy"].join_sync_group.remote(host, port, world, self.backend)]  # rank 0
        self.group.get(refs, "joining the weight-sync group")

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        """One contiguous shard of the prompts per engine; prompt i samples with seed + i whichever
        engine runs it (as corral's engine), so the split does not change the samples."""
        per_prompt = [params if params.seed is None else params.model_copy(update={"seed": params.seed + i})
                      for i in range(len(prompts))]
        n, k = len(prompts), len(self.engines)
        bounds = [n * j // k for j in range(k + 1)]
        refs = {f"vllm engine {j}": [e.generate.remote(prompts[bounds[j]:bounds[j + 1]],
                                                       per_prompt[bounds[j]:bounds[j + 1]])]
                for j, e in enumerate(self.engines) if bounds[j + 1] > bounds[j]}
        out = self.group.get(refs, "sampling")
        return [ids for j in range(k) for ids in out.get(f"vllm engine {j}", [])]

    def sync(self) -> dict:
        """The policy's current weights into every engine, in memory."""
        self.group.get({f"vllm engine {i}": [e.start_weight_update.remote()] for i, e in enumerate(self.engines)},
                       "syncing weights")
        stats = self.group.call("policy", "push_weights", self.engines, self.transport, doing="syncing weights")
        self.group.get({f"vllm engine {i}": [e.finish_weight_update.remote()] for i, e in enumerate(self.engines)},
                       "syncing weights")
        return stats

    def shutdown(self) -> None:
        for engine in self.engines:
            ray.kill(engine, no_restart=True)
        for pg in self.pgs:
            remove_placement_group(pg)
        self.engines, self.pgs = [], []


Rollouts = PolicyRollouts | VllmRollouts


def start_rollouts(group, cfg: RolloutConfig, policy: str, resources: RoleResources, seed: int = 0) -> Rollouts:
    """The step's rollout backend; vLLM engines start from `policy`'s Hugging Face export (written
    once under the model cache, `CORRAL_MODEL_CACHE`), the only file they read."""
    if cfg.engine == "corral":
        return PolicyRollouts(group)
    from corral.registry import model_cache
    from corral.vllm_engine import hf_export

    return VllmRollouts(group, str(hf_export(policy, model_cache())), cfg, resources, seed)


def push_weights(named: Iterable[tuple[str, torch.Tensor]], config: ModelConfig, engines: list, transport: str,
                 group=None) -> dict:
    """Policy rank 0's side of a sync: one layer at a time into every engine, then wait for them."""
    tensors = nbytes = 0
    for chunk in hf_layers(named, config):
        if transport == "object_store":
            ref = ray.put(chunk)  # stored once, read by every engine
            ray.get([e.load_weights.remote(ref) for e in engines])
        else:
            specs = [(name, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for name, t in chunk]
            refs = [e.receive_weights.remote(specs) for e in engines]
            for _, tensor in chunk:
                broadcast(group, tensor.to(_device(group)).contiguous())
            ray.get(refs)
        tensors += len(chunk)
        nbytes += sum(t.nbytes for _, t in chunk)
    return {"tensors": tensors, "bytes": nbytes}


def _device(group) -> torch.device:
    import torch.distributed as dist

    return torch.device("cpu") if isinstance(group, dist.ProcessGroupGloo) else torch.device("cuda", torch.cuda.current_device())
