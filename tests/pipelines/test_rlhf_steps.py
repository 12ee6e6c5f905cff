"""Rejection sampling and PPO for real, small: a real Ray cluster, real DeepSpeed ZeRO-3 in the
role actors, a real MLflow server.

The models come from a short in-process warm start (plain torch: the fixture, not the code under
test): a small Llama 2 fine-tuned for a few steps on the task suite's dialogs, and two reward
models trained from it with the margin ranking loss. The policy is left half-trained on purpose:
it refuses some unsafe requests and complies with others, so there is reward to gain and the
PPO test fails if PPO does nothing. The last two tests sample on vLLM engines (its CPU build) instead
of in the policy role, and check that the in-memory weight sync moves the policy's weights.
"""

import json
import math
import random
import time

import pytest
import torch
from torch.testing import assert_close

from corral import load_model, tracking
from corral.checkpoint import export_hf, save_model
from corral.config import ModelConfig
from corral.data.formats import read_records, write_records
from corral.data.sft import encode_dialog, encode_record, pack, packed_rows
from corral.data.tasks import TaskSuite
from corral.model import Transformer
from corral.reward import RewardModel, pad_batch, save_reward_model
from corral.train.losses import margin_of, ranking_loss, sft_loss

SMALL = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=4096, multiple_of=32, max_seq_len=96)
ROLES = {"cpus_per_role": 0.5, "call_timeout_s": 600}
ZERO3 = {"zero_stage": 3, "bf16": True}


def warm_start(model, batches, steps: int, lr: float, loss_fn) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        loss = loss_fn(model, batches[step % len(batches)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def gpt2_init(model):
    """N(0, 0.02) weights, the fixture's init before corral's default changed: these tests' step sizes
    were set on the warm start from it. From corral's default init (embeddings N(0, 1)) the same 120
    steps gave reward models under which best-of-4 fine-tuning lowered held-out reward at lr 1e-4-5e-4."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.ones_like(p) if p.dim() == 1 else torch.randn_like(p) * 0.02)
    return model


def pair_batches(tokenizer, pairs, size=16):
    out = []
    for i in range(0, len(pairs) - size + 1, size):
        chunk = pairs[i:i + size]
        chosen = [encode_dialog(tokenizer, [{"role": "user", "content": p["prompt"]},
                                            {"role": "assistant", "content": p["chosen"]}])[0] for p in chunk]
        rejected = [encode_dialog(tokenizer, [{"role": "user", "content": p["prompt"]},
                                              {"role": "assistant", "content": p["rejected"]}])[0] for p in chunk]
        out.append((pad_batch(chosen), pad_batch(rejected), margin_of([p["rating"] for p in chunk], "large")))
    return out


def rm_loss(model, batch):
    (c, cl), (r, rl), margin = batch
    return ranking_loss(model(c, cl), model(r, rl), margin)


def sft_warm_start(config: ModelConfig, tokenizer) -> Transformer:
    """A policy fine-tuned for 120 steps on the task suite's dialogs."""
    packed = pack([encode_record(tokenizer, r) for r in TaskSuite(0).sft_dialogs(800)], config.max_seq_len)
    rows = [{"input_ids": torch.from_numpy(packed["input_ids"][i:i + 8]),
             "labels": torch.from_numpy(packed["labels"][i:i + 8])} for i in range(0, len(packed["labels"]), 8)]
    lm = gpt2_init(Transformer(config))
    warm_start(lm, rows, 120, 3e-3, lambda m, b: sft_loss(m, b)[0])
    return lm


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a loaded 2-core machine one thread trains ~5x faster than two
    root = tmp_path_factory.mktemp("rlhf-models")
    suite = TaskSuite(0)
    lm = sft_warm_start(SMALL, tokenizer)
    save_model(lm, root / "sft", tokenizer, metadata={"stage": "test-warm-start"})
    paths = {"policy": str(root / "sft")}
    # the safety model sees ~10 % helpfulness pairs (as Llama 2's). Its pairs are the safety family's
    # alone, as when these tests' thresholds were set: 90 warm-start steps on the suite's newer pairs
    # (a quarter of them tasks over refusals) give reward models this weak policy does not gain on.
    safety = suite.preference_pairs(432, safety=True, with_tasks=False) + suite.preference_pairs(48, split="train")
    random.Random(0).shuffle(safety)
    for kind, pairs in (("helpful", suite.preference_pairs(480)), ("safety", safety)):
        rm = RewardModel.from_lm(lm)
        warm_start(rm, pair_batches(tokenizer, pairs), 90, 2e-3, rm_loss)
        rm.tokenizer = tokenizer
        save_reward_model(rm, root / kind)
        paths[kind] = str(root / kind)
    torch.set_num_threads(threads)
    return paths


def rl_config(models, tmp_path, **extra):
    return {
        "policy": models["policy"], "helpful_reward": models["helpful"], "safety_reward": models["safety"],
        "prompts": {"n_train": 32, "n_eval": 24, "safety_fraction": 0.5}, "max_new_tokens": 12,
        "output_dir": str(tmp_path / "out"), "deepspeed": ZERO3, "resources": ROLES,
        "tracking": {"experiment": "test-rlhf"}, **extra,
    }


@pytest.mark.slow
def test_roles_share_one_placement_group_and_a_dead_role_fails_clearly(ray_cluster, models, tmp_path):
    import ray
    from ray.util import placement_group_table

    from corral.rlhf.actors import RoleFailed, RoleGroup
    from corral.rlhf.config import PPOConfig
    from corral.rlhf.ppo import ppo_roles

    cfg = PPOConfig.model_validate(rl_config(models, tmp_path))
    group = RoleGroup(ppo_roles(cfg, models["policy"], models["helpful"], models["safety"]), cfg.resources, "PPO")
    try:
        assert set(group.where) == {"policy", "critic", "reference", "helpful", "safety"}
        assert len({w["pid"] for w in group.where.values()}) == 5  # one process per role
        table = placement_group_table(group.pg)
        assert table["state"] == "CREATED" and len(table["bundles"]) == 5
        assert all(b == {"CPU": 0.5} for b in table["bundles"].values())
        ray.kill(group["critic"], no_restart=True)
        started = time.monotonic()
        with pytest.raises(RoleFailed, match="PPO role 'critic' died while computing values"):
            group.call("critic", "values", torch.zeros(1, 4, dtype=torch.long), doing="computing values")
        assert time.monotonic() - started < 60  # surfaced at once, not after call_timeout_s
    finally:
        group.shutdown()


@pytest.mark.slow
def test_frozen_roles_as_two_rank_inference_groups_hold_half_and_answer_as_one_actor(ray_cluster, models):
    """The reference and a reward model as 2-rank ZeRO-3 inference groups (how `resources.ranks`
    fits a 70B reference on 80 GB GPUs): each rank holds half of the parameters, and on the same
    inputs the group answers what one actor does (fp32)."""
    from corral.data.formats import prompt_messages
    from corral.rlhf.actors import ReferenceActor, RewardActor, Role, RoleGroup
    from corral.rlhf.config import RoleResources

    group = RoleGroup({"reference": Role(ReferenceActor, (models["policy"], False), 2),
                       "one_reference": Role(ReferenceActor, (models["policy"], False)),
                       "safety": Role(RewardActor, (models["safety"], False), 2),
                       "one_safety": Role(RewardActor, (models["safety"], False))}, RoleResources(**ROLES), "frozen")
    try:
        tokens = torch.randint(0, SMALL.vocab_size, (8, 40), generator=torch.Generator().manual_seed(0))
        dialogs = [prompt_messages(r["prompt"]) + [{"role": "assistant", "content": "I can't help with that."}]
                   for r in TaskSuite(0).rl_prompts(8, "eval", 0.5)]
        out = group.get({"reference": group.remote("reference", "logprobs", tokens),
                         "one_reference": group.remote("one_reference", "logprobs", tokens),
                         "safety": group.remote("safety", "score", dialogs),
                         "one_safety": group.remote("one_safety", "score", dialogs)}, "scoring")
        assert_close(out["reference"], out["one_reference"], rtol=1e-5, atol=1e-5)
        assert_close(out["safety"], out["one_safety"], rtol=1e-5, atol=1e-6)
        held = group.get({role: group.remote(role, "parameters_held") for role in group.actors}, "counting",
                         every_rank=True)
        for role in ("reference", "safety"):
            whole = held[f"one_{role}"][0]
            assert [h * 2 for h in held[role]] == pytest.approx([whole, whole], rel=0.01), (role, held)
    finally:
        group.shutdown()


def test_roles_the_cluster_cannot_place_fail_in_time_naming_what_did_not_fit(ray_cluster):
    """Five roles of 100 CPUs each on this cluster: refused after call_timeout_s, nothing left placed."""
    import ray

    from corral.placement import PlacementFailed
    from corral.rlhf.actors import ReferenceActor, Role, RoleGroup
    from corral.rlhf.config import RoleResources

    with pytest.raises(PlacementFailed, match=r"PPO \(\{'reference': 5\} ranks\): the cluster cannot place 5 x "
                                              r"\{'CPU': 100.0\} \(PACK\) within 2s; free now: .*ranks or add nodes"):
        RoleGroup({"reference": Role(ReferenceActor, ("unused", False), 5)},
                  RoleResources(cpus_per_role=100, call_timeout_s=2), "PPO")
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


@pytest.mark.slow
def test_a_role_that_cannot_start_fails_the_step_naming_it(ray_cluster, mlflow_server, models, tmp_path):
    from corral.rlhf.actors import RoleFailed
    from pipelines.steps import rejection_sampling

    config = rl_config(models, tmp_path) | {"safety_reward": models["policy"]}  # a language model, no reward head
    with pytest.raises(RoleFailed, match="rejection sampling role 'safety' could not start: .*not a reward model"):
        rejection_sampling.run(config, {})


@pytest.mark.slow
def test_ppo_raises_reward_on_its_training_prompts(ray_cluster, mlflow_server, models, tmp_path):
    from pipelines.steps import ppo

    out = ppo.run(rl_config(models, tmp_path, iterations=10, rollout_batch_size=32, minibatch_size=16,
                            optim={"lr": 5e-4, "warmup_steps": 0, "schedule": "constant"}, max_kl=50.0,
                            critic_optim={"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"},
                            save_every=2, samples_every=4), {})
    run_id = out["mlflow_run_id"]
    rewards = [v for _, v in tracking.metric_history(run_id, "reward")]
    assert len(rewards) == 10
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    # PPO that does nothing keeps the reward flat (the mean of 32 prompts' rewards moves ~0.015 from one
    # iteration to the next; a difference of two 3-iteration means, ~0.012). The same run gained +0.044 on
    # one CPU, more than 0.05 on others and +0.0246 on 2026-12-06's host (the same history before and after
    # the role groups): float kernels differ between CPUs, and ten iterations amplify the difference.
    assert last > first + 0.02, rewards
    run = tracking.client().get_run(run_id)
    for key in ("kl", "entropy", "clip_fraction", "value_loss", "approx_kl", "response_length", "policy_loss",
                "safety_gate_rate", "time_rollout_s", "time_logprobs_s", "time_update_s"):
        assert math.isfinite(run.data.metrics[key]), key
    assert run.data.params["beta_used"] == "0.01"
    artifacts = {a.path for a in tracking.client().list_artifacts(run_id, "samples")}
    assert artifacts == {f"samples/iteration_{i:05d}.json" for i in (0, 4, 8)}
    # the policy is a corral checkpoint that loads and exports
    policy = load_model(out["model"])
    assert policy.config == SMALL
    export_hf(out["model"], tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()
    summary = json.loads(open(out["summary"]).read())
    assert {"heldout_reward_start", "heldout_reward_end", "heldout_reward_delta_ci_low",
            "heldout_safety_gate_rate_start"} <= summary.keys()
    assert 0 <= summary["heldout_safety_gate_rate_start"] <= 1


@pytest.mark.slow
def test_rejection_sampling_round_logs_and_fine_tunes(ray_cluster, mlflow_server, models, tokenizer, tmp_path):
    from pipelines.steps import rejection_sampling

    # the prompts come from files, as a user's would: the suite's, written out in the rl_prompts format
    suite = TaskSuite(0)
    prompts = {"data": [str(write_records(tmp_path / "rl.jsonl", suite.rl_prompts(32, "train", 0.5)))],
               "eval_data": [str(write_records(tmp_path / "rl-eval.parquet", suite.rl_prompts(24, "eval", 0.5)))]}
    out = rejection_sampling.run(rl_config(models, tmp_path, rounds=2, samples_per_prompt=4, epochs=2,
                                           micro_batch_size=8, seq_len=96, prompts=prompts,
                                           # 1e-3 and 3e-4 pulled this weak policy toward its own over-scored
                                           # samples (held-out reward fell), as 2e-4 did in the tiny spec
                                           optim={"lr": 1e-4, "warmup_steps": 0, "schedule": "constant"}), {})
    run = tracking.client().get_run(out["mlflow_run_id"])
    for key in ("sample_reward_mean", "sample_reward_max", "best_minus_mean", "kept_accuracy", "sft_loss"):
        assert len(tracking.metric_history(run.info.run_id, key)) == 2, key
    gaps = [v for _, v in tracking.metric_history(run.info.run_id, "best_minus_mean")]
    assert all(g > 0 for g in gaps)  # K=4 samples at temperature 1.2 are not all alike
    kept = [v for _, v in tracking.metric_history(run.info.run_id, "kept_reward_mean")]
    assert kept[1] >= kept[0]  # best of all rounds so far never falls
    assert load_model(out["model"]).config == SMALL
    summary = json.loads(open(out["summary"]).read())
    assert {"heldout_reward_delta", "heldout_reward_delta_ci_low", "heldout_exact_match_end"} <= summary.keys()
    # the policy learnt its kept answers. Held-out reward is no test of that here: this weak policy's
    # change moved -0.005 (CI -0.027 to 0.009) on one CPU and gained on others; the tiny spec's is the bar.
    records = read_records(out["kept"], "sft")
    assert len(records) == 32 and all(r["messages"][-1]["role"] == "assistant" for r in records)
    assert "kept.jsonl" in {a.path for a in tracking.client().list_artifacts(run.info.run_id)}
    rows = packed_rows([encode_record(tokenizer, r) for r in records], SMALL.max_seq_len)
    with torch.no_grad():
        before = sft_loss(load_model(models["policy"]), rows)[0].item()
        after = sft_loss(load_model(out["model"]), rows)[0].item()
    assert after < before - 0.1, (before, after)  # measured: 3.97 -> 3.77


@pytest.mark.slow
def test_ppo_stops_at_the_kl_bound_and_keeps_the_last_good_policy(ray_cluster, mlflow_server, models, tmp_path):
    from pipelines.steps import ppo

    out = ppo.run(rl_config(models, tmp_path, iterations=4, rollout_batch_size=16, minibatch_size=16, max_kl=0.05,
                            optim={"lr": 3e-3, "warmup_steps": 0, "schedule": "constant"}, save_every=1), {})
    summary = json.loads(open(out["summary"]).read())
    # iteration 0 samples the reference itself (KL ~0) and is saved; one large step later KL is past 0.05
    assert summary["last_good"] == 0 and summary["iterations"] == 1, summary
    assert "passed max_kl 0.05" in summary["stop_reason"]
    run = tracking.client().get_run(out["mlflow_run_id"])
    assert "passed max_kl" in run.data.tags["corral.ppo.stopped_early"]
    assert load_model(out["model"]).config == SMALL


@pytest.mark.slow
def test_ppo_ptx_holds_on_to_the_sft_answers(ray_cluster, mlflow_server, models, tokenizer, tmp_path):
    """PPO-ptx: the same large-step PPO run with and without the SFT term. Without it the policy
    drifts from the demonstrations; with it the SFT loss on held-out dialogs stays lower."""
    from pipelines.steps import ppo

    held = packed_rows([encode_record(tokenizer, r) for r in TaskSuite(0).sft_dialogs(64, split="eval")],
                       SMALL.max_seq_len)

    def run(coef: float) -> tuple[float, str]:
        cfg = rl_config(models, tmp_path / f"ptx{coef}", iterations=6, rollout_batch_size=16, minibatch_size=8,
                        optim={"lr": 2e-3, "warmup_steps": 0, "schedule": "constant"}, max_kl=1e9,
                        ptx={"coef": coef, "tasks": {"train_size": 200}, "rows_per_step": 4, "seq_len": 96})
        cfg["prompts"]["n_eval"] = 0
        out = ppo.run(cfg, {})
        with torch.no_grad():
            return sft_loss(load_model(out["model"]), held)[0].item(), out["mlflow_run_id"]

    plain, _ = run(0.0)
    with_ptx, run_id = run(1.0)
    ptx_losses = [v for _, v in tracking.metric_history(run_id, "ptx_loss")]
    assert len(ptx_losses) == 6 and all(math.isfinite(v) for v in ptx_losses)
    with torch.no_grad():
        start = sft_loss(load_model(models["policy"]), held)[0].item()
    assert with_ptx < plain - 0.5, (start, plain, with_ptx)  # measured: 1.42 at the start, 4.15 plain, 1.60 with ptx


# vLLM rollout engines on this CPU (the CPU build of vLLM's API): fp32 so that greedy decoding is corral's
# token for token, a small KV cache on this shared machine, no compile step at start-up
VLLM_ROLLOUT = {"engine": "vllm", "dtype": "float32", "cpus_per_engine": 1,
                "vllm": {"kv_cache_memory_bytes": 64 << 20, "enforce_eager": True}}


# vLLM's CPU attention takes head sizes of 32 and up (SMALL's are 16): the same model with half the heads
VLLM_SMALL = SMALL.model_copy(update={"n_heads": 2, "n_kv_heads": 1})


@pytest.fixture(scope="module")
def vllm_policy(tokenizer, tmp_path_factory) -> str:
    """A policy vLLM's CPU build can run, warm-started as `models`' (whose reward models score it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    path = save_model(sft_warm_start(VLLM_SMALL, tokenizer), tmp_path_factory.mktemp("vllm-policy"), tokenizer,
                      metadata={"stage": "test-warm-start"})
    torch.set_num_threads(threads)
    return str(path)


def files_under(*roots) -> dict[str, tuple[int, int]]:
    """Every file under the roots with its size and mtime: what a disk round trip would change."""
    from pathlib import Path

    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for root in roots for p in Path(root).rglob("*")
            if p.is_file()}


@pytest.mark.slow
def test_vllm_rollouts_follow_the_policy_through_in_memory_weight_syncs(ray_cluster, vllm_policy, tokenizer, tmp_path):
    """Two vLLM engines (prompts split between them) sample greedily what the corral engine samples
    from the policy's ZeRO-3 weights; after a policy update they still sample the old policy until a
    sync, then the new one's tokens exactly, over either transport, and no file is written."""
    from corral.config import DeepSpeedConfig, OptimConfig
    from corral.data.formats import prompt_messages
    from corral.engine import SamplingParams
    from corral.registry import model_cache
    from corral.rlhf.actors import PolicyActor, Role, RoleGroup
    from corral.rlhf.config import RoleResources, RolloutConfig
    from corral.rlhf.generators import start_rollouts

    resources = RoleResources(**ROLES)
    optim = OptimConfig(lr=3e-3, warmup_steps=0, schedule="constant")
    group = RoleGroup({"policy": Role(PolicyActor, (vllm_policy, DeepSpeedConfig(zero_stage=3, bf16=False), optim, 8),
                                      ranks=1)}, resources, "vLLM rollouts")
    prompts = [tokenizer.encode_chat(prompt_messages(r["prompt"])) for r in TaskSuite(0).rl_prompts(8, "eval", 0.5)]
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    rows = packed_rows([encode_record(tokenizer, r) for r in TaskSuite(1).sft_dialogs(48)], SMALL.max_seq_len)
    rollouts = None

    def corral_rollouts() -> list[list[int]]:
        return group.call("policy", "generate", prompts, greedy)

    def update_policy() -> None:
        for i in range(0, len(rows["labels"]), 8):
            group.call("policy", "train_sft", {k: v[i:i + 8] for k, v in rows.items()})

    try:
        started = time.perf_counter()
        rollouts = start_rollouts(group, RolloutConfig(**VLLM_ROLLOUT, num_engines=2), vllm_policy, resources)
        print(f"\ntwo vLLM engines started in {time.perf_counter() - started:.0f} s")
        assert rollouts.transport == "object_store"  # the CPU default
        start = corral_rollouts()
        assert rollouts.generate(prompts, greedy) == start
        files = files_under(model_cache(), tmp_path, vllm_policy)
        for transport in ("object_store", "broadcast"):
            if transport == "broadcast":  # the GPU path's torch.distributed group, over gloo here
                rollouts.join_broadcast_group()
            before = rollouts.generate(prompts, greedy)
            update_policy()
            updated = corral_rollouts()
            assert updated != before  # the update changed what the policy says
            assert rollouts.generate(prompts, greedy) == before  # the engines still hold the old weights
            started = time.perf_counter()
            stats = rollouts.sync()
            print(f"sync over {transport}: {stats['bytes'] / 1e6:.1f} MB in {time.perf_counter() - started:.2f} s")
            assert stats["tensors"] == 9 * VLLM_SMALL.n_layers + 3, stats
            assert rollouts.generate(prompts, greedy) == updated, transport
        assert files_under(model_cache(), tmp_path, vllm_policy) == files  # no disk round trip
    finally:
        if rollouts is not None:
            rollouts.shutdown()
        group.shutdown()


@pytest.mark.slow
def test_rejection_sampling_with_vllm_rollouts(ray_cluster, mlflow_server, models, vllm_policy, tmp_path):
    """The rejection-sampling step end to end on a vLLM engine: two rounds, a weight sync after each."""
    from pipelines.steps import rejection_sampling

    out = rejection_sampling.run(rl_config(models, tmp_path, policy=vllm_policy, rounds=2, samples_per_prompt=2,
                                           epochs=1, micro_batch_size=8, seq_len=96, rollout=VLLM_ROLLOUT,
                                           optim={"lr": 1e-4, "warmup_steps": 0, "schedule": "constant"}), {})
    run = tracking.client().get_run(out["mlflow_run_id"])
    assert run.data.params["rollout.engine"] == "vllm"
    for key in ("sample_reward_mean", "kept_reward_mean", "sft_loss"):
        assert len(tracking.metric_history(run.info.run_id, key)) == 2, key
    assert len(read_records(out["kept"], "sft")) == 32
    summary = json.loads(open(out["summary"]).read())
    assert {"heldout_reward_delta", "heldout_exact_match_end"} <= summary.keys()
    assert load_model(out["model"]).config == VLLM_SMALL


FP32 = {"zero_stage": 3, "bf16": False}
COMPARED = ("reward", "kl", "response_length", "policy_loss", "value_loss", "approx_kl", "entropy", "clip_fraction",
            "grad_norm")


def short_ppo(models, tmp_path, **extra):
    """Three iterations of 16 rollouts in minibatches of 8, fp32, no held-out set: the smallest PPO
    run in which every update (two steps an iteration) feeds the next rollout."""
    cfg = rl_config(models, tmp_path, iterations=3, rollout_batch_size=16, minibatch_size=8, max_kl=50.0,
                    deepspeed=FP32, optim={"lr": 5e-4, "warmup_steps": 0, "schedule": "constant"},
                    critic_optim={"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"}, **extra)
    cfg["prompts"]["n_eval"] = 0
    return cfg


@pytest.mark.slow
def test_two_rank_policy_and_critic_groups_train_as_one_rank_roles(ray_cluster, mlflow_server, models, tmp_path):
    """The same PPO run with the policy and critic as 2-rank ZeRO-3 groups and as 1-rank roles.

    Each rank takes half of every minibatch, its loss weighted by its share of the minibatch's
    response tokens (`shard_rows`), so the group's averaged gradient is the whole minibatch's, and
    the two runs differ only by float summation order (the reduce-scatter adds two halves): same
    sampled tokens, same rewards, losses equal to 1e-4 relative. Every rank of every role also
    reports that its model's forward only ever received tensors on the role's own device."""
    from corral.checkpoint import load_tokenizer
    from corral.rlhf.actors import RoleGroup
    from corral.rlhf.config import PPOConfig
    from corral.rlhf.generators import PolicyRollouts
    from corral.rlhf.ppo import ppo_roles, train_ppo
    from corral.rlhf.rollout import load_prompts

    def run(ranks: dict) -> tuple[list[dict], dict, dict]:
        cfg = PPOConfig.model_validate(short_ppo(models, tmp_path / f"r{len(ranks)}",
                                                 resources=ROLES | {"ranks": ranks}))
        train, _ = load_prompts(cfg.prompts)
        run_id = tracking.start_run("test-rlhf", f"groups-{ranks}")
        group = RoleGroup(ppo_roles(cfg, models["policy"], models["helpful"], models["safety"]), cfg.resources, "PPO")
        try:
            result = train_ppo(cfg, group, PolicyRollouts(group), load_tokenizer(models["policy"]), train, 0.01,
                               run_id, tmp_path / f"r{len(ranks)}" / "policy")
            seen = group.get({role: group.remote(role, "inputs_seen") for role in group.actors}, "reporting devices",
                             every_rank=True)
        finally:
            group.shutdown()
            tracking.end_run(run_id)
        return result["history"], seen, group.placement

    groups, seen, placement = run({"policy": 2, "critic": 2})
    single, _, _ = run({})
    assert [len(placement[r]) for r in ("policy", "critic", "reference", "helpful", "safety")] == [2, 2, 1, 1, 1]
    assert len({p["pid"] for ranks in placement.values() for p in ranks}) == 7  # one process per rank
    assert [p["rank"] for p in placement["policy"]] == [0, 1]
    assert {p["dtype"] for role in ("policy", "critic") for p in placement[role]} == {"torch.float32"}
    for role, ranks in seen.items():
        for rank in ranks:
            assert rank["seen"] == [rank["device"]], (role, rank)  # forwards ran, on the role's device only
    assert len(groups) == len(single) == 3
    for key in COMPARED:
        a, b = [h[key] for h in groups], [h[key] for h in single]
        print(f"{key}: largest relative difference, 2 ranks vs 1: "
              f"{max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)):.2e}")
        assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                     rtol=1e-4, atol=1e-6, msg=f"{key}: 2 ranks {a}, 1 rank {b}")


@pytest.mark.slow
def test_ppo_rerun_continues_after_the_last_save_in_the_same_run(ray_cluster, mlflow_server, models, tmp_path,
                                                                 monkeypatch):
    """A PPO step that stops during iteration 2 (saving after every iteration) and is run again
    continues at iteration 2 in the same MLflow run, with the policy, critic, optimizers and
    generators of the save: its metrics are those of an uninterrupted run. Iteration 2's losses
    average two minibatches, the second taken after an Adam step, so they depend on the restored
    optimizer state as well as on the weights."""
    from corral.rlhf import ppo as loop
    from pipelines.steps import ppo

    make_experience = loop.make_experience

    def stopped_at_2(group, rollouts, tokenizer, records, cfg, beta, seed):
        if seed == cfg.seed * 1_000_003 + 2:
            raise RuntimeError("stopped at iteration 2 (the test's stand-in for a lost node)")
        return make_experience(group, rollouts, tokenizer, records, cfg, beta, seed)

    config = short_ppo(models, tmp_path / "resumed", save_every=1)
    monkeypatch.setattr(loop, "make_experience", stopped_at_2)
    with pytest.raises(RuntimeError, match="stopped at iteration 2"):
        ppo.run(config, {})
    monkeypatch.undo()
    out = tmp_path / "resumed" / "out"
    first_run = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    assert tracking.client().get_run(first_run).info.status == "FAILED"
    assert torch.load(out / "state" / "driver.pt", weights_only=True)["next"] == 2
    resumed = ppo.run(config, {})["mlflow_run_id"]
    assert resumed == first_run and tracking.client().get_run(resumed).info.status == "FINISHED"
    straight = ppo.run(short_ppo(models, tmp_path / "straight", save_every=1), {})["mlflow_run_id"]
    for key in COMPARED:
        a, b = tracking.metric_history(straight, key), tracking.metric_history(resumed, key)
        assert [s for s, _ in b] == [0, 1, 2], (key, b)  # iterations 0-1 from the first attempt, 2 from the re-run
        assert_close(torch.tensor([v for _, v in b], dtype=torch.float64),
                     torch.tensor([v for _, v in a], dtype=torch.float64), rtol=1e-5, atol=1e-7,
                     msg=f"{key}: resumed {b}, uninterrupted {a}")


@pytest.mark.slow
def test_rejection_sampling_rerun_continues_after_the_last_saved_round(ray_cluster, mlflow_server, models, tmp_path,
                                                                       monkeypatch):
    """Rejection sampling stopped in round 1 continues there on a re-run, in the same MLflow run, with
    the policy, its optimizer and the best answers of round 0: its rounds log what an uninterrupted
    run's do, and it keeps the same answers."""
    from corral.rlhf import rejection as loop
    from pipelines.steps import rejection_sampling

    def config(name):
        cfg = rl_config(models, tmp_path / name, rounds=2, samples_per_prompt=2, epochs=1, micro_batch_size=8,
                        seq_len=96, deepspeed=FP32, optim={"lr": 1e-4, "warmup_steps": 0, "schedule": "constant"})
        cfg["prompts"] |= {"n_train": 16, "n_eval": 0}
        return cfg

    sample_and_score, calls = loop.sample_and_score, []

    def stopped_in_round_1(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("stopped in round 1")
        return sample_and_score(*args, **kwargs)

    monkeypatch.setattr(loop, "sample_and_score", stopped_in_round_1)
    with pytest.raises(RuntimeError, match="stopped in round 1"):
        rejection_sampling.run(config("resumed"), {})
    monkeypatch.undo()
    resumed = rejection_sampling.run(config("resumed"), {})
    straight = rejection_sampling.run(config("straight"), {})
    first_run = json.loads((tmp_path / "resumed" / "out" / "mlflow_run.json").read_text())["run_id"]
    assert resumed["mlflow_run_id"] == first_run
    for key in ("sample_reward_mean", "kept_reward_mean", "sft_loss"):
        a = tracking.metric_history(straight["mlflow_run_id"], key)
        b = tracking.metric_history(resumed["mlflow_run_id"], key)
        assert [s for s, _ in b] == [0, 1], (key, b)
        assert_close(torch.tensor([v for _, v in b], dtype=torch.float64),
                     torch.tensor([v for _, v in a], dtype=torch.float64), rtol=1e-5, atol=1e-7)
    assert read_records(resumed["kept"], "sft") == read_records(straight["kept"], "sft")
