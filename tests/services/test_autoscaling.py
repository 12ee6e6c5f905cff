"""Autoscaling on heterogeneous pools, exercised: services/configs/gpu-pools.yaml's placement and
autoscaling on a local three-node Ray cluster whose nodes carry the A100 and H100 pools' custom
resources (`accelerator_type:A100` / `accelerator_type:H100`, what Ray gives a real GPU node).

Under load on the chat model (H100 pool) its deployment scales out on the H100 node only, while
base (A100 pool) stays at one replica; when the load drops it scales back in, and the requests in
flight on the replicas being stopped finish normally (Serve's graceful drain). Serve's replica
states, sampled through the run, show each step. The drain is real: the two streams opened while three
replicas run go to two different ones (power-of-two-choices routing sends the second to the less
busy of two), and scaling in to one replica stops at least one of them mid-stream.

The cluster runs in a child process with its own RAY_TMPDIR: a driver joins one Ray cluster only,
and the rest of the suite shares the session's. Real Ray Serve over HTTP on 127.0.0.1, the official
`openai` client, bounded request loops.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MAX_REPLICAS = 3
TARGET_ONGOING = 2  # requests per replica the autoscaler aims for
LOAD_CLIENTS = 12  # concurrent chat streams while scaling out: 6 replicas' worth, capped at MAX_REPLICAS
DRAIN_CLIENTS = 2  # one replica's worth: the autoscaler scales in while these stream
DRAIN_TOKENS = 1900  # per drain stream: ~20-30 s of decoding here


def pools_config(base: str, chat: str, port: int) -> dict:
    """gpu-pools.yaml as shipped (accelerator types, autoscaling), shrunk to CPU replicas of tiny
    models on the corral engine and to autoscaling delays of seconds, on 127.0.0.1. Only its first
    application: the 70B one needs a node of 8 GPUs; and the corral engine, not the shipped vLLM,
    because every scale-up would pay vLLM's minute-long start-up (placement does not depend on it)."""
    config = yaml.safe_load((REPO / "services/configs/gpu-pools.yaml").read_text())
    config.update(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    config["applications"] = config["applications"][:1]
    app = config["applications"][0]
    app.pop("runtime_env", None)
    for role, path in (("base", base), ("chat", chat)):
        app["args"][role].pop("vllm", None)
        app["args"][role].update(model=path, dtype="float32", max_batch_size=8, engine="corral")
    for dep in app["deployments"]:
        options = dep["ray_actor_options"]
        options.pop("num_gpus", None)
        if dep["name"] == "OpenAIServer":
            dep.update(autoscaling_config={"min_replicas": 1, "max_replicas": 1})
            options["num_cpus"] = 0.25
            continue
        assert options["accelerator_type"] in ("A100", "H100")  # the shipped pools
        options["num_cpus"] = 0.5
        dep.update(max_ongoing_requests=8, max_queued_requests=64, graceful_shutdown_timeout_s=120,
                   autoscaling_config={"min_replicas": 1, "max_replicas": MAX_REPLICAS,
                                       "target_ongoing_requests": TARGET_ONGOING, "look_back_period_s": 2,
                                       "upscale_delay_s": 1, "downscale_delay_s": 6})
    return config


@pytest.fixture(scope="module")
def long_context_models(tmp_path_factory, tokenizer):
    """Tiny base and chat checkpoints with a 2,048-token context whose replies never end early: the
    end-of-sequence row of the output layer is zeroed and the others scaled up, so EOS's logit sits
    far below the largest. A drain stream then runs its full length, longer than scaling in takes."""
    import torch

    import corral
    from corral.config import ModelConfig
    from corral.model import Transformer

    root = tmp_path_factory.mktemp("autoscale-models")
    config = ModelConfig.preset("tiny").model_copy(update={"max_seq_len": 2048})
    paths = {}
    for seed, role in enumerate(("base", "chat")):
        model = Transformer(config).init_weights(seed=seed)
        with torch.no_grad():
            model.output.weight.mul_(10)
            model.output.weight[tokenizer.eos_id].zero_()
        paths[role] = str(corral.save_model(model, root / role, tokenizer))
    return paths


def test_chat_scales_out_on_its_pool_and_drains_on_scale_in(long_context_models):
    from tests.conftest import free_port

    config = pools_config(long_context_models["base"], long_context_models["chat"], free_port())
    for attempt in range(2):
        with tempfile.TemporaryDirectory(prefix="rs-", dir="/tmp") as tmp:  # short: Ray's socket paths
            env = {**os.environ, "RAY_TMPDIR": tmp, "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
                   "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}
            for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # its own cluster, never the session's
                env.pop(var, None)
            ports = {"dashboard_port": free_port()}  # the GCS picks a free port itself
            done = subprocess.run([sys.executable, __file__, json.dumps(config), json.dumps(ports)], env=env,
                                  capture_output=True, text=True, timeout=420)
        # Ray gives a starting node a fixed 30 s to register; on a host loaded far past its cores that
        # can pass. The child's exit killed its processes: one fresh cluster gets a second try.
        if done.returncode == 0 or "timed out during startup" not in done.stderr:
            break
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    timeline, nodes = result["timeline"], result["nodes"]
    changes = [t for i, t in enumerate(timeline) if i == 0 or {**t, "t": 0} != {**timeline[i - 1], "t": 0}]
    print("\n".join(f"{t['t']:6.1f}s chat {t['chat']} base {t['base']}" for t in changes))
    print(json.dumps({k: v for k, v in result.items() if k != "timeline"}))

    # scaled out under load, on the H100 node only; base never left its one replica on the A100 node
    assert max(t["chat"].get("RUNNING", 0) for t in timeline) == MAX_REPLICAS
    assert set(result["chat_nodes"]) == {nodes["H100"]} and set(result["base_nodes"]) == {nodes["A100"]}
    assert all(t["base"] == {"RUNNING": 1} for t in timeline)
    # and back in once the load dropped, through STOPPING replicas
    assert timeline[-1]["chat"] == {"RUNNING": 1}
    stopping = [t["t"] for t in timeline if t["chat"].get("STOPPING")]
    assert stopping, "no chat replica was seen stopping"
    # every request finished normally, and streams were open while replicas stopped (drained)
    assert result["failed"] == [] and result["load_requests"] > 0
    first_pair = sorted(result["drain_requests"], key=lambda r: r["start"])[:DRAIN_CLIENTS]
    assert len(first_pair) == DRAIN_CLIENTS and all(r["start"] < stopping[0] < r["end"] for r in first_pair)
    assert all(r["finish_reason"] == "length" and r["tokens"] == DRAIN_TOKENS for r in result["drain_requests"])
    # a replica with nothing in flight goes within Serve's 2 s wait loop; one stayed STOPPING until a
    # stream ended, many seconds after scale-in began: it drained that stream. Samples come about a
    # second apart and a drained replica exits at once, so the proof is that no sample saw it gone
    # before the stream ended: the first sample after the last STOPPING one comes after that end.
    first_end = min(r["end"] for r in first_pair)
    gone = next(t["t"] for t in timeline if t["t"] > max(stopping))
    assert gone >= first_end > stopping[0] + 5, (gone, first_end, stopping)


# -- the child process: cluster, Serve, load, samples ------------------------------------------------------
def scenario(config: dict, ports: dict) -> dict:
    import asyncio
    import threading
    import time

    import openai
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.serve.schema import ServeDeploySchema
    from ray.util.state import list_actors

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": True,
                                                            "dashboard_host": "127.0.0.1", **ports})
    pools = {accel: cluster.add_node(num_cpus=2, resources={f"accelerator_type:{accel}": 1}).node_id
             for accel in ("A100", "H100")}
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        serve.start(http_options=config["http_options"] | {"location": config["proxy_location"]})
        serve.context._get_global_client().deploy_apps(ServeDeploySchema.model_validate(config))
        deadline = time.time() + 180
        while (status := serve.status().applications.get("corral")) is None or status.status != "RUNNING":
            if time.time() > deadline or (status and status.status == "DEPLOY_FAILED"):
                raise RuntimeError(f"Serve did not start: {status}")
            time.sleep(0.5)

        start, timeline, placed, stop = time.time(), [], {"chat": set(), "base": set()}, threading.Event()

        def states() -> dict:
            deployments = serve.status().applications["corral"].deployments
            return {d: {str(k): v for k, v in deployments[d].replica_states.items() if v} for d in ("chat", "base")}

        sampler_errors = []

        def sample():  # replica states twice a second, and where the replicas live
            while not stop.is_set():
                # On a host loaded far past its cores a state-API call can time out; one failed
                # sample must not end the sampling (a frozen timeline would read as no scale-in).
                try:
                    timeline.append({"t": time.time() - start, **states()})
                    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=200, timeout=10):
                        for d in placed:
                            if actor.class_name == f"ServeReplica:corral:{d}":
                                placed[d].add(actor.node_id)
                except Exception as e:  # noqa: BLE001 - counted and reported in the result
                    sampler_errors.append(f"{type(e).__name__}: {e}"[:200])
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        url = f"http://127.0.0.1:{config['http_options']['port']}/v1"
        failed = []

        def running(deployment: str) -> int:
            return serve.status().applications["corral"].deployments[deployment].replica_states.get("RUNNING", 0)

        async def chat(client, max_tokens: int) -> dict:
            t0 = time.time() - start
            try:
                reply = await client.chat.completions.create(
                    model="corral-chat", messages=[{"role": "user", "content": "Speak, my lord"}],
                    max_tokens=max_tokens, temperature=1.0, stream=True, stream_options={"include_usage": True})
                chunks = [c async for c in reply]
            except Exception as e:  # noqa: BLE001 - recorded and asserted on by the test
                failed.append(f"{type(e).__name__}: {e}")
                return {}
            reason = next(c.choices[0].finish_reason for c in reversed(chunks) if c.choices)
            return {"start": t0, "end": time.time() - start, "finish_reason": reason,
                    "tokens": chunks[-1].usage.completion_tokens}

        async def load(n: int, limit_s: float) -> int:
            """n clients sending short requests back to back until chat runs MAX_REPLICAS replicas."""
            client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=180)
            deadline, sent = time.time() + limit_s, []

            async def loop():
                while running("chat") < MAX_REPLICAS and time.time() < deadline:
                    sent.append(await chat(client, 64))

            await asyncio.gather(*(loop() for _ in range(n)))
            return len(sent)

        async def streams(n: int) -> list[dict]:
            client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
            return [r for r in await asyncio.gather(*(chat(client, DRAIN_TOKENS) for _ in range(n))) if r]

        load_requests = asyncio.run(load(LOAD_CLIENTS, 150))
        scaled_out = time.time() - start
        drain = asyncio.run(streams(DRAIN_CLIENTS))  # the autoscaler scales in while these run
        deadline = time.time() + 120  # a loaded host stops replicas slowly
        while states()["chat"] != {"RUNNING": 1} and time.time() < deadline:
            time.sleep(0.5)
        stop.set()
        sampler.join()
        timeline.append({"t": time.time() - start, **states()})
        return {"nodes": pools, "chat_nodes": sorted(placed["chat"]), "base_nodes": sorted(placed["base"]),
                "scaled_out_at": scaled_out, "load_requests": load_requests, "drain_requests": drain, "failed": failed,
                "sampler_errors": sampler_errors, "timeline": timeline}
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    print(json.dumps(scenario(json.loads(sys.argv[1]), json.loads(sys.argv[2]))), flush=True)
