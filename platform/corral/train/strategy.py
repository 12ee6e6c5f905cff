"""The DeepSpeed strategy: the one place in corral that calls `deepspeed.*` (OpenRLHF's pattern).

Stage code has the strategy `build` its model (born partitioned under ZeRO-3, weights streamed
in one tensor at a time), `prepare` it, then only calls `forward`, `backward`, `step`, `save`,
`load` and `gathered_parameters`. ZeRO stage, bf16, CPU offload, activation checkpointing,
gradient accumulation and clipping come from `DeepSpeedConfig`; nothing else changes between a
2-core CPU (gloo) and a GPU cluster (NCCL).

Checkpoints are DeepSpeed's own files (each rank writes its own shard). Loading them unpickles
(`torch.load(weights_only=False)` inside DeepSpeed): acceptable only because they are files this
run wrote itself; never point `load` at a checkpoint from elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from corral.config import DeepSpeedConfig, OptimConfig
from corral.model import WeightSource, fill_parameters, flat_slice
from corral.train.schedule import lr_lambda

CHECKPOINT_TAG = "state"  # one tag per checkpoint directory: the directory itself is versioned by Ray
STATE_FILE = "corral_state.json"  # the world size that wrote the shards, and the loop's client state


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices (linear layers, embeddings), none on norm gains.

    Decaying RMSNorm gains pulls them towards 0 and shrinks the residual stream; Llama 2, like
    GPT-2 and nanoGPT, decays only the 2-D weights.
    """
    def is_matrix(p: nn.Parameter) -> bool:  # a parameter born partitioned (zero.Init) keeps its shape in ds_shape
        return len(getattr(p, "ds_shape", p.shape)) >= 2

    decay = [p for p in model.parameters() if p.requires_grad and is_matrix(p)]
    no_decay = [p for p in model.parameters() if p.requires_grad and not is_matrix(p)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def rng_state() -> dict:
    """Python, NumPy and torch RNG states as tensors and numbers, so `weights_only=True` reads them."""
    version, py_keys, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "keys": torch.tensor(py_keys, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["keys"].tolist()), py["gauss"]))
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


FAST_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # CPU instructions that give bf16 matmuls a fast path


def cpu_flags() -> set[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def slow_bf16_warning(bf16: bool, cuda: bool, flags: set[str]) -> str | None:
    """A warning when bf16 training would run on a CPU without a bf16 fast path (AVX-512 bf16 or
    AMX), where bf16 matmuls crawl (docs/design-notes.md, "bf16 on a CPU"), else None."""
    if not bf16 or cuda or not flags or any(f in flags for f in FAST_BF16_FLAGS):
        return None
    return ("warning: deepspeed.bf16 is on, but this CPU has no bf16 instructions (avx512_bf16 or amx_bf16): "
            "bf16 matmuls can run over 100x slower than fp32 here. Set `deepspeed: {bf16: false}` for CPU runs.")


class DeepSpeedStrategy:
    """Wraps one model in a DeepSpeed engine: ZeRO 0-3, bf16, offload, accumulation, clipping."""

    def __init__(self, ds: DeepSpeedConfig, optim: OptimConfig, micro_batch_size: int, max_steps: int):
        self.ds, self.optim = ds, optim
        self.micro_batch_size, self.max_steps = micro_batch_size, max_steps
        self.engine = None
        self.universal = False  # resuming from a checkpoint of another world size (see `load`)
        self._measured_grad_norm: torch.Tensor | None = None

    # -- process group ---------------------------------------------------------------------------
    @staticmethod
    def init_distributed() -> None:
        """Join (or, alone, create) the process group DeepSpeed uses; gloo on CPU, NCCL on GPU.

        Under Ray Train the group already exists; a standalone script gets a world of one.
        """
        import deepspeed
        import deepspeed.ops

        if not dist.is_initialized():
            for var, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                                 ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511")):
                os.environ.setdefault(var, default)
        if not torch.cuda.is_available():
            # On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce when a process group
            # starts: ~100 s on 2 cores, repeated whenever another process built it with other
            # flags, under a file lock that a killed process leaves behind (every later start
            # then waits forever). Only its `inference_all_reduce` uses it; training does not.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    def is_rank0(self) -> bool:
        return self.rank == 0

    def deepspeed_config(self) -> dict:
        zero: dict = {"stage": self.ds.zero_stage}
        if self.ds.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        if self.ds.offload_params:
            zero["offload_param"] = {"device": "cpu"}
        return {
            "train_micro_batch_size_per_gpu": self.micro_batch_size,
            "gradient_accumulation_steps": self.ds.grad_accum_steps,
            "gradient_clipping": self.ds.grad_clip,
            "bf16": {"enabled": self.ds.bf16},
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,  # torch's AdamW: the groups above need a client optimizer
            "steps_per_print": 1 << 30,  # corral logs; DeepSpeed stays quiet
            "wall_clock_breakdown": False,
        }

    # -- build ---------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.ds.bf16 else torch.float32

    def build(self, make_model: Callable[[], nn.Module], weights: Callable[[], WeightSource] | None) -> nn.Module:
        """The model, constructed and filled so that no rank holds it whole under ZeRO-3.

        ZeRO-3: `make_model` runs inside `deepspeed.zero.Init`, so each parameter is partitioned
        (in the training dtype) as soon as its module exists, and each rank then fills its own
        partition, reading only that share of each tensor from the checkpoint (`weights()`: a
        `WeightReader`, or a seeded init, computed whole and cut). No gather, no broadcast: a
        rank's memory is its partition plus one share of one tensor. Other stages: every rank
        builds and fills the whole model. `weights=None` leaves the parameters as built (a
        checkpoint is about to replace them).
        """
        import deepspeed

        self.init_distributed()
        if self.ds.zero_stage != 3:
            model = make_model()
            if weights is not None:
                fill_parameters(model, weights())
        else:
            # the dtype comes from the config's bf16 flag: an explicit `dtype=` is dropped on a machine
            # without fp16 (a CPU) by DeepSpeed 0.19's `Init._set_dtype`, whose `dtype or fp16 if ... else
            # bf16 if get_accelerator().is_bf16_supported else fp32` (a method, always true) gives bf16:
            # "fp32" ZeRO-3 then held bf16 parameters and reduced bf16 gradients.
            with deepspeed.zero.Init(config_dict_or_path=self.deepspeed_config()):
                model = make_model()
            if weights is not None:
                fill_partitions(model, weights(), self.rank)
        model.activation_checkpointing = self.ds.activation_checkpointing
        return model

    def prepare(self, model: nn.Module, resume_from: str | os.PathLike | None = None) -> nn.Module:
        """Wrap `model` with AdamW (Llama 2 betas/eps/decay) and the warmup-cosine schedule.

        `resume_from`: the checkpoint `load` will read. One written by another number of ranks is
        loaded through DeepSpeed's universal checkpoint format (see `load`).
        """
        import deepspeed

        self.init_distributed()
        if warning := slow_bf16_warning(self.ds.bf16, torch.cuda.is_available(), cpu_flags()):
            print(warning, file=sys.stderr, flush=True)
        self.universal = resume_from is not None and saved_world_size(resume_from) != self.world_size
        o = self.optim
        groups = param_groups(model, o.weight_decay)
        if self.ds.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, adamw_mode=True)
        else:
            # fused: one kernel for all parameters (CPU and CUDA), ~3x faster than torch's per-tensor loop
            # for a small model on a CPU (docs/design-notes.md).
            optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o, self.max_steps))
        config = self.deepspeed_config() | ({"checkpoint": {"load_universal": True}} if self.universal else {})
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=config)
        return self.engine

    def prepare_frozen(self, model: nn.Module) -> nn.Module:
        """Wrap a model that is only ever run forward: no optimizer, no optimizer state. Under ZeRO-3
        its parameters stay partitioned over the ranks and are gathered a layer at a time for each
        forward (DeepSpeed's ZeRO-Inference), so every rank holds 1/N of the weights."""
        import deepspeed

        self.init_distributed()
        self.engine, _, _, _ = deepspeed.initialize(model=model, config=self.deepspeed_config())
        self.engine.eval()
        return self.engine

    # -- one step --------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch; DeepSpeed scales by 1/grad_accum_steps itself."""
        self.engine.backward(loss)

    def step(self) -> bool:
        """Optimizer + schedule step at an accumulation boundary (clipping included); True if it stepped."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary and not (self.engine.bfloat16_enabled() or self.engine.zero_optimization()):
            # DeepSpeed's plain fp32 path clips without keeping the norm: measure it here (no sync)
            norms = [p.grad.norm() for p in self.engine.module.parameters() if p.grad is not None]
            self._measured_grad_norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else None
        self.engine.step()
        return boundary

    def grad_norm(self) -> float:
        """Global gradient norm before clipping, of the last optimizer step."""
        norm = self.engine.get_global_grad_norm()
        norm = self._measured_grad_norm if norm is None else norm
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return self.engine.lr_scheduler.get_last_lr()[0]

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    @property
    def device(self) -> torch.device:
        return self.engine.device

    # -- collectives -----------------------------------------------------------------------------
    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean over ranks (a host-device sync on GPU when the caller reads it)."""
        value = value.detach().to(self.device, torch.float32).clone()
        if self.world_size > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.world_size
        return value

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    # -- checkpoints ---------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, client_state: dict) -> None:
        """Every rank writes its shard of model, optimizer and scheduler, plus its RNG states.

        Collective. `client_state` (data position, step, ...) goes into `corral_state.json` with
        the world size that wrote the shards.
        """
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG)
        torch.save(rng_state(), Path(directory) / f"rng_rank{self.rank}.pt")
        if self.is_rank0():
            state = {"world_size": self.world_size, "client_state": client_state}
            (Path(directory) / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    def load(self, directory: str | os.PathLike) -> dict:
        """Restore model, optimizer, scheduler and RNG; returns the client state.

        Collective. The same number of ranks reads its own shards. Another number (elastic
        resume: 2 workers continue a run of 4) reads the checkpoint converted once to DeepSpeed's
        universal format, whose per-parameter files any partitioning can slice; each rank then
        takes the RNG of the rank with its index, or rank 0's.
        """
        directory = Path(directory)
        source = self._universal(directory) if self.universal else directory
        path, _ = self.engine.load_checkpoint(str(source), tag=CHECKPOINT_TAG,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint with tag {CHECKPOINT_TAG!r} in {directory}")
        if self.universal:
            self._repair_universal_load()
        rng = directory / f"rng_rank{self.rank}.pt"
        set_rng_state(torch.load(rng if rng.is_file() else directory / "rng_rank0.pt", weights_only=True))
        return json.loads((directory / STATE_FILE).read_text())["client_state"]

    def _repair_universal_load(self) -> None:
        """Undo two slips of DeepSpeed 0.19's ZeRO-3 universal load (stage3.py,
        `load_hp_checkpoint_state_from_checkpoint_dir_stage3`): it gives every param group group
        0's hyperparameters, weight decay included (norm gains would start decaying), and one
        shared `step` tensor, which the fused AdamW then advances once per group per step (a
        wrong bias correction from the first step on). Found by comparing a resumed run with an
        uninterrupted one."""
        inner = self.engine.optimizer.optimizer
        for group, decay in zip(inner.param_groups, (self.optim.weight_decay, 0.0), strict=True):
            group["weight_decay"] = decay
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    def _universal(self, directory: Path) -> Path:
        """`directory` in DeepSpeed's universal layout, converted by rank 0 on first use.

        The conversion lands beside the shards (`universal/`), where every rank reads it: the
        checkpoint directory must be on storage all workers share, as Ray Train's storage_path is.
        """
        from deepspeed.checkpoint import ds_to_universal

        out = directory / "universal"
        if self.is_rank0() and not (out / "done").is_file():
            args = argparse.Namespace(input_folder=str(directory / CHECKPOINT_TAG),
                                      output_folder=str(out / CHECKPOINT_TAG), num_extract_workers=1,
                                      num_merge_workers=1, keep_temp_folder=False, strict=True,
                                      inject_missing_state=False)
            print(f"resuming on {self.world_size} ranks from a checkpoint of {saved_world_size(directory)}: "
                  f"converting it to DeepSpeed's universal format in {out}", file=sys.stderr, flush=True)
            ds_to_universal.main(args)
            (out / "latest_universal").write_text(CHECKPOINT_TAG)
            (out / "done").touch()
        self.barrier()
        return out

    def gathered_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter whole, one at a time, as the optimizer keeps it (the fp32 master where
        there is one); only rank 0 receives them.

        Collective: every rank must drain it. A full model never exists on any rank, so a 70B
        export needs one tensor of host memory, not 280 GB.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        for name, p in self.engine.module.named_parameters():
            full = safe_get_full_fp32_param(p)  # all-gather under ZeRO-3; None without a master copy
            if self.is_rank0():
                yield name, (p if full is None else full).detach().cpu().clone()

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model (`gathered_parameters`) on rank 0; None on other ranks. Collective."""
        state = dict(self.gathered_parameters())
        return state if self.is_rank0() else None


def fill_partitions(model: nn.Module, weights: WeightSource, rank: int) -> None:
    """Fill this rank's ZeRO-3 partition of every parameter: elements [rank * n, (rank + 1) * n) of
    the flattened tensor, n = its partition size (the last rank's is padded)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            part = p.ds_tensor
            start = rank * part.numel()
            end = min(start + part.numel(), p.ds_numel)
            if end > start:
                part[:end - start].copy_(flat_slice(weights, name, p.ds_shape, start, end))


def saved_world_size(directory: str | os.PathLike) -> int:
    """How many ranks wrote a checkpoint `DeepSpeedStrategy.save` made."""
    return json.loads((Path(directory) / STATE_FILE).read_text())["world_size"]
