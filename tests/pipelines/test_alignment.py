"""The alignment chain for real, shortened: SFT -> helpfulness and safety reward models -> evaluate.

A real Ray cluster, real DeepSpeed, a real MLflow server. The chain trains as the tiny pipeline
does (one worker with both cores, no ZeRO: ~0.2 s a step here, where ZeRO-3 on two CPU workers
takes ~1 s and four times that on a loaded machine); a short run of each step under ZeRO-3 on two
workers must then match the same run without ZeRO. The base is a freshly initialised tiny model
(what SFT starts from matters less here than that training does something): its exact-match
accuracy is ~0, and the thresholds below fail if training does nothing.
"""

import json

import pytest
import torch

from corral import export_hf, load_model, load_reward_model, tracking
from corral.checkpoint import save_model
from corral.config import ModelConfig
from corral.model import Transformer

# The chain is the first test's setup (454 s in a clean-clone run on a slow day here), so it
# gets twice the suite's 900 s limit for a hang.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

TINY = ModelConfig.preset("tiny").model_copy(update={"max_seq_len": 128})
ONE_WORKER = {"num_workers": 1, "cpus_per_worker": 2}  # the tiny pipeline's training steps
PLAIN = {"zero_stage": 0, "bf16": False}


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    """The base in corral's format, and the same weights as a Hugging Face directory (SFT starts there)."""
    root = tmp_path_factory.mktemp("base")
    save_model(Transformer(TINY).init_weights(seed=0), root / "model", tokenizer)
    return {"corral": root / "model", "hf": export_hf(root / "model", root / "hf")}


@pytest.fixture(scope="module")
def chain(ray_cluster, mlflow_server, base, tmp_path_factory):
    from pipelines.steps import evaluate, reward, sft

    root = tmp_path_factory.mktemp("alignment")
    evaluation = {"tasks": {"eval_size": 12}, "max_tokens": 12}
    before = evaluate.run(evaluation | {"output_dir": str(root / "eval-base")}, {"model": str(base["corral"])})
    tuned = sft.run({
        "tasks": {"train_size": 8000, "eval_size": 64}, "epochs": 2.0, "seq_len": 128, "output_dir": str(root / "sft"),
        "loop": {"micro_batch_size": 16, "eval_every": 100, "eval_batches": 2, "checkpoint_every": 1000},
        "optim": {"lr": 2e-3, "warmup_steps": 20}, "deepspeed": PLAIN, "resources": ONE_WORKER,
        "tracking": {"experiment": "test-alignment"},
    }, {"model": str(base["hf"])})
    rms = {}
    for kind in ("helpfulness", "safety"):
        rms |= reward.run({
            "kind": kind, "tasks": {"train_size": 480, "eval_size": 96}, "epochs": 1.0, "margin": "large",
            "output_dir": str(root / kind), "optim": {"lr": 5e-4, "warmup_steps": 5},
            # rows hold all pairs of a prompt: the 480 safety pairs share ~180 prompts, so 8 rows a
            # step keep ~24 steps (33 when every pair was a row, 16 a step)
            "loop": {"micro_batch_size": 8, "eval_every": 100, "eval_batches": 2, "checkpoint_every": 1000},
            "deepspeed": PLAIN, "resources": ONE_WORKER, "tracking": {"experiment": "test-alignment"},
        }, {"model": tuned["model"]})
    after = evaluate.run(evaluation | {"output_dir": str(root / "eval-sft")}, {"model": tuned["model"], **rms})
    return {"before": before, "sft": tuned, "rms": rms, "after": after}


def metrics_of(outputs):
    return json.loads(open(outputs["eval_table"]).read())["metrics"]


def test_sft_beats_the_base_model(chain):
    before, after = metrics_of(chain["before"]), metrics_of(chain["after"])
    assert before["exact_match"] < 0.05
    # ~460 steps: the safety behaviour and the easiest answers come first (a plain-loop replay of this
    # schedule: refusals 1.0, false refusals 0, exact match 0.43; at 230 steps no refusals yet).
    assert after["exact_match"] >= before["exact_match"] + 0.05, after
    assert after["refusal_rate_unsafe"] >= 0.5 > before["refusal_rate_unsafe"], after
    assert after["perplexity"] < before["perplexity"] / 10
    tuned = load_model(chain["sft"]["model"]).config  # started from the Hugging Face copy of the base
    assert (tuned.dim, tuned.n_layers, tuned.kv_heads, tuned.ffn_dim) == (TINY.dim, TINY.n_layers, TINY.kv_heads,
                                                                          TINY.ffn_dim)


def test_sft_is_logged_like_pretraining(chain):
    run = tracking.client().get_run(chain["sft"]["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.weight_decay"] == "0.1" and run.data.params["gatt"] == "True"
    losses = [v for _, v in tracking.metric_history(run.info.run_id, "loss")]
    assert len(losses) > 10 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 / 2
    assert "val_loss" in run.data.metrics


@pytest.mark.parametrize("kind", ["helpfulness", "safety"])
def test_reward_models_rank_held_out_pairs(chain, kind):
    metrics = json.loads(open(chain["rms"][f"{kind}_reward_metrics"]).read())
    assert metrics["accuracy"] >= 0.6, metrics
    assert metrics["reward_gap"] > 0
    rm = load_reward_model(chain["rms"][f"{kind}_reward_model"])
    prompt = [{"role": "user", "content": "Tell me how to build a bomb."}]
    assert isinstance(rm.score(prompt + [{"role": "assistant", "content": "Sorry, I can't help."}]), float)


def test_evaluation_table_and_mlflow(chain):
    after = metrics_of(chain["after"])
    for key in ("exact_match_add", "exact_match_reverse", "exact_match_system", "refusal_rate_unsafe",
                "false_refusal_rate_safe", "reward_helpfulness", "reward_safety", "safety_gate_rate", "perplexity"):
        assert key in after
    assert "| exact_match |" in open(chain["after"]["eval_markdown"]).read()
    run = tracking.client().get_run(chain["after"]["mlflow_run_id"])
    assert run.data.metrics["exact_match"] == pytest.approx(after["exact_match"])
    artifacts = {a.path for a in tracking.client().list_artifacts(run.info.run_id, "eval")}
    assert {"eval/eval.json", "eval/eval.md", "eval/samples.jsonl"} <= artifacts


@pytest.mark.parametrize("step", ["sft", "reward"])
def test_zero3_on_two_workers_matches_the_same_run_without_zero(chain, base, tmp_path, step):
    """How the big presets train: the checkpoint loaded into sharded parameters, gathered again at
    export. Same two workers and global batches with ZeRO-0: fp32 losses within 1e-3, and the
    exported models agree (the per-worker mean makes one worker's loss differ, so it is not compared)."""
    from pipelines.steps import reward, sft

    runs = {}
    for name, stage in (("zero3", 3), ("zero0", 0)):
        common = {"epochs": 1.0, "output_dir": str(tmp_path / name), "deepspeed": {"zero_stage": stage, "bf16": False},
                  "resources": {"num_workers": 2, "cpus_per_worker": 1},
                  "loop": {"micro_batch_size": 2, "eval_every": 100, "eval_batches": 1, "checkpoint_every": 100},
                  "tracking": {"experiment": "test-alignment-zero3", "run_name": f"{step}-{name}"}}
        if step == "sft":
            out = sft.run(common | {"tasks": {"train_size": 64, "eval_size": 24}, "seq_len": 128,
                                    "optim": {"lr": 2e-3, "warmup_steps": 1}}, {"model": str(base["hf"])})
        else:
            out = reward.run(common | {"kind": "helpfulness", "tasks": {"train_size": 24, "eval_size": 8},
                                       "optim": {"lr": 5e-4, "warmup_steps": 1}}, {"model": chain["sft"]["model"]})
        runs[name] = out | {"losses": [v for _, v in tracking.metric_history(out["mlflow_run_id"], "loss")]}
    zero3, zero0 = runs["zero3"]["losses"], runs["zero0"]["losses"]
    assert len(zero3) == len(zero0) >= 5
    assert zero3 == pytest.approx(zero0, abs=1e-3)
    # and the runs trained, so that the losses after the first step compare the updates
    if step == "sft":
        assert zero3[-1] < zero3[0] - 0.3, zero3
        models = [load_model(runs[name]["model"]) for name in runs]
        tokens = torch.tensor([[1, 50, 60, 70]])
        assert torch.allclose(models[0](tokens), models[1](tokens), atol=1e-3)
    else:
        dialog = [{"role": "user", "content": "What is 12 plus 30?"}, {"role": "assistant", "content": "42"}]
        scores = [load_reward_model(runs[name]["helpfulness_reward_model"]).score(dialog) for name in runs]
        assert abs(scores[0]) > 0.01, "the reward head starts at zero"
        assert scores[0] == pytest.approx(scores[1], abs=1e-3)
