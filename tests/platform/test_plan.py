"""`corral plan`: the big specs fit 80 GB, model states agree with DeepSpeed's estimators, the
activation count agrees with what autograd saves, and an over-sized step fails validation."""

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage3 import model_to_params as zero3_model_to_params
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from corral.cli import main
from corral.config import DeepSpeedConfig, ModelConfig
from corral.demo import readme_blocks, run_block
from corral.model import Transformer
from corral.plan import (activation_bytes, block_activation_bytes, largest_layer_params, logits_bytes,
                         model_state_bytes)
from pipelines.spec import SpecError, load_spec

SPECS = Path(__file__).resolve().parents[2] / "pipelines/specs"
BIG = ["llama2-7b", "llama2-13b", "llama2-70b"]
PLANNED = {"pretrain", "sft", "reward_helpful", "reward_safety", "rejection_sampling", "ppo"}


@pytest.mark.parametrize("name", BIG)
def test_every_step_of_the_big_specs_fits_80gb(name):
    plans = load_spec(SPECS / f"{name}.yaml").plan()
    assert {p.step for p in plans} == PLANNED | {"evaluate"}
    for p in plans:
        assert p.accelerator_memory_bytes == 80 * 10**9 and p.accelerator_type in ("A100", "H100")
        assert p.fits and 0 < p.per_accelerator_bytes <= p.accelerator_memory_bytes, p.step
        if p.step != "evaluate":
            assert p.activations_bytes == p.activations_checkpointing_bytes < p.activations_no_checkpointing_bytes


@pytest.mark.parametrize("name", BIG)
def test_the_paper_benchmarks_are_planned_on_their_accelerators(name):
    """The evaluate step: bf16 weights + KV cache over its GPUs, and the whole run's time."""
    from corral.config import ModelConfig

    evaluate, = [p for p in load_spec(SPECS / f"{name}.yaml").plan() if p.step == "evaluate"]
    n = ModelConfig.preset(name).num_params()
    assert evaluate.params_bytes == 2 * n // evaluate.accelerators  # bf16, split by tensor parallelism
    assert evaluate.tokens_per_step > 10_000_000  # MMLU 5-shot alone is ~9M tokens
    expected = 2 * n * evaluate.tokens_per_step / (evaluate.accelerators * 989e12 * 0.4)
    assert evaluate.step_time_s == pytest.approx(expected) and 60 < evaluate.step_time_s < 3600


@pytest.mark.parametrize("name", BIG)
def test_pretraining_keeps_the_papers_4m_token_batch(name):
    spec = load_spec(SPECS / f"{name}.yaml")
    cfg, seq_len = spec.step_config("pretrain"), spec.step_config("data").seq_len
    tokens = cfg.loop.micro_batch_size * cfg.resources.num_workers * cfg.deepspeed.grad_accum_steps * seq_len
    assert tokens == 4096 * 1024 == 4_194_304
    plan = next(p for p in spec.plan() if p.step == "pretrain")
    assert plan.tokens_per_step == tokens and plan.accelerators == cfg.resources.num_workers


@pytest.mark.parametrize("name", BIG)
def test_the_big_specs_roll_out_on_vllm_engines_of_their_own_gpus(name):
    """RLHF rollouts on vLLM (the tiny spec stays on corral's engine): the plan adds the engines' GPUs,
    and one engine GPU holds its share of the bf16 weights and the KV cache; one tensor-parallel rank
    less and the 70B engine would not fit."""
    spec = load_spec(SPECS / f"{name}.yaml")
    plans = {p.step: p for p in spec.plan()}
    n = ModelConfig.preset(name).num_params()
    for step, roles in (("rejection_sampling", ("policy", "helpful", "safety")),
                        ("ppo", ("policy", "critic", "reference", "helpful", "safety"))):
        cfg = spec.step_config(step)
        tp = cfg.rollout.vllm.tensor_parallel_size
        assert cfg.rollout.engine == "vllm"
        bundles = sum(cfg.resources.ranks_of(role) for role in roles)  # one per rank
        assert plans[step].accelerators == bundles * cfg.resources.gpus_per_role + cfg.rollout.num_engines * tp
        assert 2 * n // tp < plans[step].kv_cache_bytes <= plans[step].per_accelerator_bytes
    assert load_spec(SPECS / "llama2-tiny.yaml").step_config("ppo").rollout.engine == "corral"
    if name == "llama2-70b":
        with pytest.raises(SpecError, match="rollout.vllm.tensor_parallel_size"):
            load_spec(SPECS / f"{name}.yaml", ["steps.ppo.config.rollout.vllm.tensor_parallel_size=1"]).plan()
        # a 70B reference (138 GB in bf16) on one GPU does not fit: the spec splits it over 4 ranks
        alone = "steps.ppo.config.resources.ranks={policy: 32, critic: 32, helpful: 4, safety: 4}"
        with pytest.raises(SpecError, match=r"the reference model's weights on one rank.*resources.ranks.reference"):
            load_spec(SPECS / f"{name}.yaml", [alone]).plan()
        frozen = plans["ppo"].frozen_bytes
        assert plans["ppo"].frozen_role in ("reference", "helpful", "safety") and 2 * n / 4 < frozen < 0.5 * 80e9


def within(ours: float, theirs: float, rel: float = 0.10) -> bool:
    return abs(ours - theirs) <= rel * theirs


@pytest.mark.parametrize("preset,nodes", [("llama2-7b", 1), ("llama2-7b", 8), ("llama2-13b", 16), ("llama2-70b", 4),
                                          ("llama2-70b", 64)])
def test_model_states_agree_with_deepspeeds_estimators(preset, nodes):
    """Per-GPU bytes on 8-GPU nodes, ZeRO-3 (with and without offload) and ZeRO-2, bf16, zero.Init."""
    model = ModelConfig.preset(preset)
    n, largest, ranks = model.num_params(), largest_layer_params(model), 8 * nodes
    for offload_optimizer, offload_params in [(False, False), (True, False), (True, True)]:
        ds = DeepSpeedConfig(zero_stage=3, offload_optimizer=offload_optimizer, offload_params=offload_params)
        params, grads, optim, host = model_state_bytes(model, ds, ranks)
        host_per_node, gpu = estimate_zero3_model_states_mem_needs(
            n, largest, num_gpus_per_node=8, num_nodes=nodes, cpu_offload=offload_optimizer,
            cpu_offload_params=offload_params, zero_init=True, additional_buffer_factor=1.0)[:2]
        assert within(params + grads + optim, gpu), (offload_optimizer, offload_params, params + grads + optim, gpu)
        if offload_optimizer:  # DeepSpeed's 1.5 "additional buffer" slack left out on both sides
            assert within(8 * host, host_per_node), (host, host_per_node)
    for offload in (False, True):
        params, grads, optim, _ = model_state_bytes(model, DeepSpeedConfig(zero_stage=2, offload_optimizer=offload),
                                                    ranks)
        gpu = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=8, num_nodes=nodes, cpu_offload=offload)[1]
        assert within(params + grads + optim, gpu), (offload, params + grads + optim, gpu)


def test_parameter_counts_match_deepspeeds_count_of_a_real_model():
    """What the estimators' `_all_live` variant counts on a built corral model: total and largest layer."""
    config = ModelConfig.preset("tiny")
    assert zero3_model_to_params(Transformer(config)) == (config.num_params(), largest_layer_params(config))


def saved_bytes(model: Transformer, tokens: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for backward in a forward + loss, parameters left
    out, plus the fp32 logits the caller holds until backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens)
        F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    seen[logits.untyped_storage().data_ptr()] = logits.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_activation_formula_matches_what_autograd_saves(dtype):
    config = ModelConfig(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=1024, multiple_of=32,
                         max_seq_len=512)
    model, e = Transformer(config).to(dtype), 2 if dtype == torch.bfloat16 else 4
    tokens = torch.randint(0, config.vocab_size, (2, 512), generator=torch.Generator().manual_seed(0))
    predicted = activation_bytes(config, 512, 2, e, checkpointing=False) + logits_bytes(config, 512, 2)
    measured = saved_bytes(model, tokens)
    print(f"{dtype}: predicted {predicted / 1e6:.1f} MB, autograd saved {measured / 1e6:.1f} MB")
    assert within(predicted, measured, 0.05)
    # the model's own checkpointing: each block keeps its input; one block's activations come back in backward
    model.activation_checkpointing = True
    kept = saved_bytes(model, tokens)
    predicted_kept = activation_bytes(config, 512, 2, e, checkpointing=True) + logits_bytes(config, 512, 2)
    recomputed = block_activation_bytes(config, 512, 2, e)
    print(f"{dtype}, checkpointed: predicted {(predicted_kept - recomputed) / 1e6:.1f} MB + one recomputed block "
          f"{recomputed / 1e6:.1f} MB, autograd saved {kept / 1e6:.1f} MB")
    assert within(predicted_kept - recomputed, kept, 0.05)


def test_an_oversized_micro_batch_fails_validation_naming_the_step_and_the_knob():
    with pytest.raises(SpecError) as e:
        load_spec(SPECS / "llama2-7b.yaml", ["steps.sft.config.loop.micro_batch_size=64"])
    assert [loc for loc, _ in e.value.problems] == ["steps.sft"]
    message = str(e.value)
    assert "step 'sft' needs" in message and "GB more than its 80 GB" in message
    assert "lower loop.micro_batch_size" in message
    with pytest.raises(SpecError, match="'V100' is not one corral.plan can size"):
        load_spec(SPECS / "llama2-7b.yaml", ["steps.sft.resources.accelerator_type=V100"])
    with pytest.raises(SpecError, match="lower benchmarks.batch_size"):
        load_spec(SPECS / "llama2-13b.yaml", ["steps.evaluate.config.benchmarks.batch_size=64"])
    with pytest.raises(SpecError, match="set deepspeed.activation_checkpointing: true"):
        load_spec(SPECS / "llama2-70b.yaml", ["steps.pretrain.config.deepspeed.activation_checkpointing=false"])


def test_plan_json_shape_and_exit_code(capsys):
    assert main(["plan", str(SPECS / "llama2-70b.yaml"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["steps"] and [s["step"] for s in out["steps"]] == [
        "pretrain", "sft", "reward_helpful", "reward_safety", "rejection_sampling", "ppo", "evaluate"]
    for s in out["steps"]:
        assert isinstance(s["per_accelerator_bytes"], int) and s["accelerator_memory_bytes"] == 80 * 10**9
        assert s["fits"] is True
    assert main(["plan", str(SPECS / "llama2-13b.yaml"), "--set", "steps.ppo.config.minibatch_size=512"]) == 2
    captured = capsys.readouterr()
    assert "ppo" in captured.out and "step 'ppo' needs" in captured.err and "minibatch_size" in captured.err
    # `pipeline validate` (and `run`, through the same load_spec) refuses it too
    assert main(["pipeline", "validate", str(SPECS / "llama2-13b.yaml"), "--set",
                 "steps.ppo.config.minibatch_size=512"]) == 2
    assert "steps.ppo: step 'ppo' needs" in capsys.readouterr().err


def test_the_readmes_table_and_command_match_the_plan(tmp_path):
    """The README's "What a 7B/13B/70B run needs" numbers are the plan's, and its block runs."""
    readme = SPECS.parents[1] / "README.md"
    rows = {m[1]: m[2] for m in re.finditer(r"^\| (\d+B) \| (.*)$", readme.read_text(), re.M)}
    assert set(rows) == {"7B", "13B", "70B"}
    for size, row in rows.items():
        plans = {p.step: p for p in load_spec(SPECS / f"llama2-{size.lower()}.yaml").plan()}
        pre, sft, ppo, ev = plans["pretrain"], plans["sft"], plans["ppo"], plans["evaluate"]
        peak = max(p.per_accelerator_bytes for p in plans.values())
        gpus = f"{ev.accelerators} GPU" + ("s" if ev.accelerators > 1 else "")
        expected = [f"{pre.nodes} nodes, {pre.per_accelerator_bytes / 1e9:.1f} GB/GPU, {pre.step_time_s:.1f} s/step",
                    f"{sft.nodes} nodes, {sft.per_accelerator_bytes / 1e9:.1f} GB",
                    f"{ppo.nodes} nodes, {ppo.per_accelerator_bytes / 1e9:.1f} GB",
                    f"{gpus}, {ev.per_accelerator_bytes / 1e9:.1f} GB, {ev.step_time_s / 60:.1f} min",
                    f"{peak / 1e9:.1f} of 80"]
        assert [c.strip() for c in row.split("|")[:5]] == expected, size
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done, _ = run_block(readme_blocks(readme)["plan"], env, SPECS.parents[1], capture=True, timeout=120)
    assert done.returncode == 0 and "pretrain" in done.stdout and "NO" not in done.stdout, done.stderr
