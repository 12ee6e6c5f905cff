"""The pretrain step for real: Ray Train + DeepSpeed ZeRO-3 on 2 CPU workers, an MLflow server.

One prepared dataset (12 Gutenberg plays, 64-token sequences) serves the whole module. Runs are
a few dozen steps of the tiny preset; each costs 30-40 s, mostly Ray Train start-up.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from corral import tracking

SEQ_LEN = 64


@pytest.fixture(scope="module")
def prepared(ray_cluster, corpus, tokenizer_dir, tmp_path_factory):
    from tests.conftest import prepare_plays

    return str(prepare_plays(corpus, tokenizer_dir, tmp_path_factory.mktemp("prepared"), seq_len=SEQ_LEN,
                             val_fraction=0.1))


def config(prepared, out, **loop) -> dict:
    return {
        "model": "tiny", "data_dir": prepared, "output_dir": str(out),
        "loop": {"micro_batch_size": 4, "max_steps": 30, "eval_every": 10, "eval_batches": 4,
                 "checkpoint_every": 10, "max_failures": 1, **loop},
        "deepspeed": {"zero_stage": 3, "bf16": True},
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "resources": {"num_workers": 2},
        "tracking": {"experiment": "test-pretrain"},
    }


def train_workers() -> list[int]:
    """Pids of the live Ray Train worker actors, from the GCS actor table (Ray's global state).

    `ray.util.state.list_actors` serves the same table through the dashboard, which on this
    loaded 2-core machine answered with an empty list while the workers were running.
    """
    from ray._private.state import actors

    return [a["Pid"] for a in actors().values()
            if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"]


def run_in_thread(cfg):
    from pipelines.steps import pretrain

    box: dict = {}

    def target():
        try:
            box["outputs"] = pretrain.run(cfg, {})
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def registered_checkpoints(out) -> list[int]:
    """Steps of the checkpoints Ray Train's controller has registered (its snapshot in storage).

    A checkpoint counts once the controller has taken the report (it polls every 2 s); a kill
    between the workers' upload and that poll leaves the run at the checkpoint before.
    """
    import re

    snapshot = out / "ray" / "pretrain" / "checkpoint_manager_snapshot.json"
    if not snapshot.is_file():
        return []
    return sorted({int(m) for m in re.findall(r"step_(\d{8})", snapshot.read_text())})


def kill_a_worker_after(out, step: int, thread, box: dict, timeout: float = 900, checkpoint: int = 0) -> int:
    """Wait until MLflow shows `step` (and Ray has registered `checkpoint`), then SIGKILL one
    training worker process; its pid."""
    deadline = time.time() + timeout
    while time.time() < deadline and thread.is_alive():
        record = out / "mlflow_run.json"
        if record.is_file():
            import json

            history = tracking.metric_history(json.loads(record.read_text())["run_id"], "loss")
            if history and max(s for s, _ in history) >= step and checkpoint in [0, *registered_checkpoints(out)]:
                workers = train_workers()
                assert workers, "Ray's state API lists no live RayTrainWorker"
                victim = workers[-1]
                os.kill(victim, signal.SIGKILL)
                return victim
        time.sleep(0.2)
    raise AssertionError(f"the run never reached step {step}: {box.get('error')!r}")


def losses_by_step(run_id: str, key: str = "loss") -> dict[int, list[float]]:
    by_step: dict[int, list[float]] = {}
    for step, value in tracking.metric_history(run_id, key):
        by_step.setdefault(step, []).append(value)
    return by_step


@pytest.mark.slow
def test_worker_killed_mid_run_costs_nothing_and_the_model_learns(prepared, tmp_path):
    """2 workers, ZeRO-3, bf16: SIGKILL one mid-run; Ray restarts from the step-10 checkpoint."""
    from corral import load_model

    out = tmp_path / "run"
    thread, box = run_in_thread(config(prepared, out))
    kill_a_worker_after(out, 13, thread, box, checkpoint=10)
    thread.join(timeout=600)
    assert "error" not in box, box.get("error")
    run_id = box["outputs"]["mlflow_run_id"]

    loss = losses_by_step(run_id)
    assert sorted(loss) == list(range(1, 31)), "every step logged, no gap"
    restarts = tracking.metric_history(run_id, "resumed_from")
    assert [s for s, _ in restarts] in ([10], [20]), restarts  # the latest checkpoint before the kill
    resumed = restarts[0][0]
    replayed = [s for s, v in loss.items() if len(v) == 2]
    assert replayed and min(replayed) == resumed + 1, replayed
    for s in replayed:  # the same batches from the same state: the same loss (bf16, gloo: deterministic)
        before, after = loss[s]
        assert after == pytest.approx(before, abs=2e-3), (s, before, after)

    # Held-out plays (their character names are new tokens) after 30 steps of 512 tokens: the
    # loss falls from uniform, ln(4096) = 8.3, to ~7.4 (train: ~6.2). 0.75 nats = perplexity / 2.1.
    val = dict(tracking.metric_history(run_id, "val_loss"))
    assert val[0] == pytest.approx(math.log(4096), abs=0.3)  # the initial model is near uniform
    assert val[30] < val[0] - 0.75 and val[30] < math.log(4096) - 0.75, val
    tokens = dict(tracking.metric_history(run_id, "tokens_seen"))
    assert tokens[30] == 30 * 4 * 2 * SEQ_LEN

    model = load_model(box["outputs"]["model"])
    assert model.config.vocab_size == 4096 and (out / "model" / "tokenizer.model").is_file()


@pytest.mark.slow
def test_rerun_of_a_failed_run_continues_from_its_last_checkpoint(prepared, tmp_path):
    """No retries allowed: the kill fails the run; running the step again finishes it exactly."""
    from pipelines.steps import pretrain

    out = tmp_path / "run"
    cfg = config(prepared, out, max_steps=16, checkpoint_every=6, eval_every=100, max_failures=0)
    thread, box = run_in_thread(cfg)
    kill_a_worker_after(out, 8, thread, box, checkpoint=6)
    thread.join(timeout=600)
    assert "error" in box, "with max_failures=0 the kill must fail the run"
    import json

    resumed = max(registered_checkpoints(out))  # 6, or 12 where the kill landed late

    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    assert tracking.client().get_run(run_id).info.status == "FAILED"
    before = losses_by_step(run_id)
    last_before = max(before)
    assert 8 <= last_before < 16

    outputs = pretrain.run(cfg, {})
    assert outputs["mlflow_run_id"] == run_id, "the re-run logs into the same MLflow run"
    assert tracking.client().get_run(run_id).info.status == "FINISHED"
    loss = losses_by_step(run_id)
    assert sorted(loss) == list(range(1, 17))
    assert tracking.metric_history(run_id, "resumed_from") == [(resumed, float(resumed))]
    # exactly the remaining batches: the steps after the checkpoint ran once more each, the
    # replayed ones on the same batches (same losses); the token count matches an uninterrupted run
    assert [s for s, v in loss.items() if len(v) == 2] == list(range(resumed + 1, last_before + 1))
    for s in range(resumed + 1, last_before + 1):
        assert loss[s][1] == pytest.approx(loss[s][0], abs=2e-3), s
    assert dict(tracking.metric_history(run_id, "tokens_seen"))[16] == 16 * 4 * 2 * SEQ_LEN
    # the re-run sought to its position: each rank read the 4 rows of each step left, nothing before
    for rank in (0, 1):
        assert tracking.metric_history(run_id, f"data_rows_read_rank{rank}") == [(16, float((16 - resumed) * 4))]
        assert tracking.metric_history(run_id, f"data_bytes_read_rank{rank}") == \
            [(16, float((16 - resumed) * 4 * (SEQ_LEN + 1) * 2))]  # uint16 ids


@pytest.mark.slow
def test_zero3_on_two_workers_matches_one_worker_without_zero(prepared, tmp_path):
    """Same init, same global batches: ZeRO-3 x 2 and plain data parallel x 1 agree (fp32, 1e-3)."""
    from pipelines.steps import pretrain

    histories = []
    for name, workers, stage, mb in (("zero3", 2, 3, 2), ("zero0", 1, 0, 4)):
        cfg = config(prepared, tmp_path / name, max_steps=6, eval_every=100, checkpoint_every=100)
        cfg["loop"]["micro_batch_size"] = mb
        cfg["deepspeed"] = {"zero_stage": stage, "bf16": False}
        cfg["resources"] = {"num_workers": workers}
        cfg["tracking"]["run_name"] = name
        run_id = pretrain.run(cfg, {})["mlflow_run_id"]
        histories.append([v for _, v in tracking.metric_history(run_id, "loss")])
    zero3, zero0 = histories
    assert len(zero3) == len(zero0) == 6
    assert zero3[-1] < zero3[0] - 0.3, "the runs must actually train for the comparison to mean anything"
    for a, b in zip(zero3, zero0):
        assert a == pytest.approx(b, abs=1e-3), (zero3, zero0)


def test_a_step_run_alone_with_an_empty_tracking_uri_logs_to_its_own_sqlite(prepared, tmp_path, monkeypatch):
    """`MLFLOW_TRACKING_URI=` (set, empty) means no server: the step's run is made and logged to in
    its output directory by this process and the workers alike (mlflow itself would use ./mlflow.db
    and ./mlruns)."""
    from pipelines.steps import pretrain

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    monkeypatch.chdir(tmp_path)
    cfg = config(prepared, tmp_path / "out", max_steps=2, eval_every=100, checkpoint_every=100)
    cfg["deepspeed"], cfg["resources"] = {"zero_stage": 0, "bf16": False}, {"num_workers": 1}
    run_id = pretrain.run(cfg, {})["mlflow_run_id"]
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    assert len(tracking.metric_history(run_id, "loss")) == 2
    assert not (tmp_path / "mlflow.db").exists()
    # ... and its artifacts (config, model) beside the database, not in ./mlruns
    artifacts = tmp_path / "out" / "mlartifacts"
    assert tracking.client().get_run(run_id).info.artifact_uri.startswith(artifacts.as_uri())
    assert list(artifacts.rglob("config.yaml")) and not (tmp_path / "mlruns").exists()


def test_bad_data_fails_before_any_worker_starts(prepared, tmp_path):
    from corral.data.pretraining import CorpusError
    from pipelines.steps import pretrain

    with pytest.raises(CorpusError, match="prepare_data"):
        pretrain.run(config(str(tmp_path / "nothing"), tmp_path / "a"), {})
    small_vocab = config(prepared, tmp_path / "b")
    small_vocab["model"] = {"dim": 64, "n_layers": 1, "n_heads": 2, "vocab_size": 1024}
    with pytest.raises(CorpusError, match="4096 pieces"):
        pretrain.run(small_vocab, {})
    too_big = config(prepared, tmp_path / "c", micro_batch_size=100_000)
    with pytest.raises(CorpusError, match="fewer than one global batch"):
        pretrain.run(too_big, {})
    assert not train_workers()


def test_workers_the_cluster_cannot_place_fail_the_run_in_time_naming_them(prepared, tmp_path):
    """Ray Train alone would wait for 64 CPUs on this 12-CPU cluster forever."""
    import ray

    from corral.placement import PlacementFailed
    from pipelines.steps import pretrain

    huge = config(prepared, tmp_path)
    huge["resources"] |= {"cpus_per_worker": 32, "placement_timeout_s": 5}
    with pytest.raises(PlacementFailed, match=r"training pretrain: the cluster cannot place 2 x \{'CPU': 32.*"
                                              r"within 5s; free now: .*Lower resources.num_workers"):
        pretrain.run(huge, {})
    assert not train_workers()
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())


@pytest.mark.slow
def test_a_checkpoint_of_two_workers_continues_on_one_and_back_and_exports_for_transformers(prepared, tmp_path):
    """Elastic resume: 2 ZeRO-3 workers train to step 4, 1 worker continues to 8, 2 workers finish
    at 12, each run picking up the last one's checkpoint. The global batch stays 4 sequences
    (2 x 2, then 1 x 4), so the loss curve must be an uninterrupted 2-worker run's. The final
    model, exported in shards by the 2 workers, gives transformers corral's logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from corral import load_model
    from pipelines.steps import pretrain

    def cfg(out, max_steps, workers):
        c = config(prepared, out, max_steps=max_steps, eval_every=100, checkpoint_every=4,
                   micro_batch_size=4 // workers, export_shard_mb=4)
        c["deepspeed"] = {"zero_stage": 3, "bf16": False}
        c["optim"] = {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant"}  # a schedule that ignores max_steps
        c["resources"] = {"num_workers": workers}
        return c

    whole = pretrain.run(cfg(tmp_path / "whole", 12, 2), {})
    expected = [v for _, v in tracking.metric_history(whole["mlflow_run_id"], "loss")]
    for max_steps, workers in ((4, 2), (8, 1), (12, 2)):
        outputs = pretrain.run(cfg(tmp_path / "elastic", max_steps, workers), {})
    run_id = outputs["mlflow_run_id"]
    assert [s for s, _ in tracking.metric_history(run_id, "resumed_from")] == [4, 8]
    losses = losses_by_step(run_id)
    assert sorted(losses) == list(range(1, 13)) and all(len(v) == 1 for v in losses.values())
    got = [v[0] for _, v in sorted(losses.items())]
    assert got[-1] < got[0] - 0.3, "the runs must train for the comparison to mean anything"
    assert got == pytest.approx(expected, abs=2e-3), (got, expected)
    # each attempt sought to its position and read only its steps' rows: 4 steps x 4 sequences a step,
    # split over the ranks of that attempt
    assert tracking.metric_history(run_id, "data_rows_read_rank0") == [(4, 8.0), (8, 16.0), (12, 8.0)]
    assert tracking.metric_history(run_id, "data_rows_read_rank1") == [(4, 8.0), (12, 8.0)]

    model_dir = Path(outputs["model"])
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3  # 12 MB of fp32 in 4 MB shards
    tokens = torch.randint(0, 4096, (2, 24))
    with torch.no_grad():
        ours = load_model(model_dir)(tokens)
        theirs = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()(tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
