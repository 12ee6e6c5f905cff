"""RLHF math against values worked out by hand (OpenRLHF's style of loss tests)."""

import math

import pytest
import torch
from torch.testing import assert_close

from corral.rlhf.objectives import combined_reward, entropy, gae, gate_rate, gather_logprobs, logit, ppo_token_rewards, whiten
from corral.train.losses import approx_kl, policy_loss, token_kl, value_loss


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_logit_inverts_sigmoid_by_hand():
    assert_close(logit(t(0.8, 0.5, 0.2)), t(math.log(4), 0.0, -math.log(4)))
    assert torch.isfinite(logit(t(0.0, 1.0))).all()  # saturated scores stay finite


def test_whiten_by_hand():
    # mean 2.5, population variance 1.25
    s = math.sqrt(1.25)
    assert_close(whiten(t(1, 2, 3, 4)), t(-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s))
    # masked entries neither count nor come out non-zero
    assert_close(whiten(t(1, 2, 3, 4, 100), mask=t(1, 1, 1, 1, 0)), t(-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s, 0))
    assert_close(whiten(t(1, 2, 3, 4), shift_mean=False), t(-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s) + 2.5)


def test_combined_reward_gate_both_sides_of_threshold_and_unsafe_tag():
    helpful = t(0.7, 0.7, 0.7, 0.7)
    safety = t(0.5, 0.14, 0.15, 0.95)
    unsafe = torch.tensor([False, False, False, True])
    # safe & safety 0.5 -> helpful; 0.14 < 0.15 -> safety; 0.15 is not below -> helpful; tagged -> safety
    assert_close(combined_reward(helpful, safety, unsafe), t(0.7, 0.14, 0.7, 0.95))
    assert_close(combined_reward(helpful, safety, unsafe, threshold=0.6), t(0.5, 0.14, 0.15, 0.95))
    # the gate's rate counts the untagged prompts only: 0.14 of the three; at 0.6 all three
    assert gate_rate(safety, unsafe) == pytest.approx(1 / 3)
    assert gate_rate(safety, unsafe, threshold=0.6) == pytest.approx(1.0)
    assert gate_rate(safety, torch.ones(4, dtype=torch.bool)) == 0.0


def test_gate_warning_above_half_names_the_rate_and_the_fix():
    from corral.rlhf.rollout import gate_warning

    assert gate_warning(0.5, 0.15) is None and gate_warning(0.0, 0.15) is None
    warning = gate_warning(0.75, 0.15)
    assert "75%" in warning and "safety_threshold 0.15" in warning and "needless refusals" in warning


def test_token_kl_and_ppo_token_rewards_by_hand():
    kl = token_kl(t(-9.0, -1.0, -2.0, -0.5)[None], t(-3.0, -1.5, -1.0, -0.5)[None], t(0, 1, 1, 0)[None])
    assert_close(kl, t(0.0, 0.5, -1.0, 0.0)[None])
    rewards = ppo_token_rewards(t(2.0), kl, t(0, 1, 1, 0)[None], beta=0.1)
    # -beta * KL per token, plus the score on the last response token (index 2)
    assert_close(rewards, t(0.0, -0.05, 0.1 + 2.0, 0.0)[None])


def test_gae_on_a_small_sequence_by_hand():
    # response = positions 1..3, rewards [0, 0, 1], values [0.5, 0.2, 0.4], gamma 1, lambda 0.95:
    # A3 = 1 - 0.4 = 0.6; A2 = (0.4 - 0.2) + 0.95 * 0.6 = 0.77; A1 = (0.2 - 0.5) + 0.95 * 0.77 = 0.4315
    rewards, values, mask = t(0, 0, 0, 1, 0)[None], t(9, 0.5, 0.2, 0.4, 7)[None], t(0, 1, 1, 1, 0)[None]
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    assert_close(advantages, t(0, 0.4315, 0.77, 0.6, 0)[None])
    assert_close(returns, t(0, 0.9315, 0.97, 1.0, 0)[None])


def test_clipped_policy_objective_by_hand():
    ratios, advantages = t(1.5, 0.5, 1.1, 0.5, 3.0), t(1, 1, -1, -1, 5)
    mask = t(1, 1, 1, 1, 0)
    # min(rA, clip(r)A): 1.2 (clipped), 0.5, -1.1, -0.8 (clipped); the last token is masked
    loss, clip_fraction = policy_loss(torch.log(ratios)[None], torch.zeros(1, 5), advantages[None], mask[None], 0.2)
    assert_close(loss, torch.tensor((-1.2 - 0.5 + 1.1 + 0.8) / 4))
    assert_close(clip_fraction, torch.tensor(0.5))


def test_value_clipping_by_hand():
    # token 0: max((1-0)^2, (0.7-0)^2) = 1; token 1: max((0.9-1)^2, (0.2-1)^2) = 0.64
    loss = value_loss(t(1.0, 0.9, 5.0)[None], t(0.5, 0.0, 0.0)[None], t(0.0, 1.0, 0.0)[None], t(1, 1, 0)[None], 0.2)
    assert_close(loss, torch.tensor(0.5 * (1 + 0.64) / 2))


def test_approx_kl_entropy_and_logprobs_by_hand():
    assert_close(approx_kl(t(math.log(2), 0.0)[None], torch.zeros(1, 2), t(1, 1)[None]),
                 torch.tensor((2 - 1 - math.log(2)) / 2))
    assert_close(entropy(torch.zeros(1, 2, 4), t(1, 1)[None]), torch.tensor(math.log(4)))
    logits = torch.log(t(0.5, 0.25, 0.25))[None, None].expand(1, 3, 3)  # every position: p = (.5, .25, .25)
    assert_close(gather_logprobs(logits, torch.tensor([[0, 1, 0]])), torch.log(t(0.25, 0.5))[None])


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_gate_extremes(threshold):
    out = combined_reward(t(0.3), t(0.6), torch.tensor([False]), threshold=threshold)
    assert_close(out, t(0.3) if threshold == 0.0 else t(0.6))


def test_kl_penalty_beta_per_preset_and_batch_checks():
    from pydantic import ValidationError

    from corral.config import ModelConfig
    from corral.rlhf.config import PPOConfig

    cfg = PPOConfig()
    assert [cfg.beta_for(ModelConfig.preset(p)) for p in ("llama2-7b", "llama2-13b", "llama2-34b", "llama2-70b")] \
        == [0.01, 0.01, 0.005, 0.005]
    assert PPOConfig(beta=0.05).beta_for(ModelConfig.preset("llama2-70b")) == 0.05
    with pytest.raises(ValidationError, match="minibatch_size"):
        PPOConfig(rollout_batch_size=32, minibatch_size=64)


def test_paired_bootstrap_interval():
    from corral.rlhf.rollout import paired_bootstrap

    assert paired_bootstrap([0.0, 0.2, 0.4], [1.0, 1.2, 1.4]) == pytest.approx((1.0, 1.0, 1.0))
    mean, low, high = paired_bootstrap([0.0] * 40, [0.1 * (i % 2) for i in range(40)])  # differences 0, 0.1, ...
    assert mean == pytest.approx(0.05) and 0.0 < low < 0.05 < high < 0.1


def test_ptx_rows_hand_out_every_row_once_per_pass_and_reject_data_that_does_not_fit(tokenizer, tmp_path):
    from corral.data.sft import IGNORE
    from corral.rlhf.config import PtxConfig
    from corral.rlhf.ppo import PtxRows

    rows = PtxRows(PtxConfig(coef=1.0, tasks={"train_size": 40}, rows_per_step=3, seq_len=128), tokenizer, seed=0)
    assert rows.n >= 6 and set(rows.rows) == {"input_ids", "labels", "positions"}
    passes = rows.n // 3
    seen = torch.cat([rows.next()["input_ids"] for _ in range(passes)])
    assert len({tuple(r.tolist()) for r in seen}) == passes * 3  # no row twice within a pass
    batch = rows.next()  # past the end of the pass: reshuffled, still full
    assert batch["labels"].shape == (3, 128) and (batch["labels"] != IGNORE).any()

    data = tmp_path / "long.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "' + "word " * 200 + '"}, '
                    '{"role": "assistant", "content": "ok"}]}\n')
    with pytest.raises(ValueError, match="no dialog fits in seq_len 32"):
        PtxRows(PtxConfig(coef=1.0, data=[str(data)], seq_len=32), tokenizer, seed=0)


def test_token_weighted_shards_give_the_whole_minibatch_token_mean_and_gradient():
    """A minibatch cut over ranks with `shard_rows` weights: the mean over ranks of weight x the
    rank's token mean (what DeepSpeed's data-parallel gradient average computes) is the token mean
    of the whole minibatch, loss and gradient alike, however unevenly the tokens fall."""
    from corral.rlhf.actors import shard_rows
    from corral.train.losses import masked_mean

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=gen)
    mask = (torch.rand(5, 7, generator=gen) < 0.5).float()
    mask[3] = 0  # a row with no response token
    w = torch.randn(7, requires_grad=True)
    whole = masked_mean(x * w, mask)
    (g_whole,) = torch.autograd.grad(whole, w)
    for ranks in (1, 2, 3):
        shards = shard_rows({"x": x, "mask": mask}, ranks, mask.sum(1))
        assert sum(len(s["x"]) for s, _ in shards) == 5
        parts = [weight * masked_mean(s["x"] * w, s["mask"]) for s, weight in shards]
        mean = sum(parts) / ranks
        assert_close(mean, whole)
        assert_close(torch.autograd.grad(mean, w)[0], g_whole)
        if ranks == 2:  # unequal shares (here 3 rows and 2 rows): an unweighted mean of the ranks' means differs
            assert not torch.allclose(sum(masked_mean(s["x"] * w, s["mask"]) for s, _ in shards) / 2, whole)
    (only, weight), = shard_rows({"x": x}, 1, mask.sum(1))
    assert weight == 1.0 and torch.equal(only["x"], x)


def test_to_device_moves_every_nested_tensor():
    """The helper every role method passes its inputs through (checked with the meta device: a device
    other than this CPU's, that every machine has)."""
    from corral.rlhf.actors import to_device

    batch = {"tokens": torch.zeros(2, 3, dtype=torch.long), "rows": [torch.ones(2), (torch.ones(1), 5)], "n": 3}
    moved = to_device(batch, torch.device("meta"))
    assert moved["tokens"].device.type == "meta" and moved["tokens"].dtype == torch.long
    assert moved["rows"][0].device.type == "meta" and moved["rows"][1][0].device.type == "meta"
    assert isinstance(moved["rows"][1], tuple) and moved["rows"][1][1] == 5 and moved["n"] == 3
    assert batch["tokens"].device.type == "cpu"  # the input is left as it was


def test_role_group_sizes_are_checked_in_the_config():
    from pydantic import ValidationError

    from corral.rlhf.config import PPOConfig, RejectionSamplingConfig, RoleResources

    assert RoleResources(ranks={"policy": 2}).ranks_of("policy") == 2
    assert RoleResources(ranks={"policy": 2}).ranks_of("critic") == 1
    assert RoleResources(ranks={"reference": 2}).group_of("reference") == 2  # a ZeRO-3 inference group
    assert RoleResources(ranks={"policy": 2}).group_of("safety") is None  # one actor
    with pytest.raises(ValidationError, match="'refrence' is not a role; the roles are policy, critic, reference"):
        RoleResources(ranks={"refrence": 2})
    with pytest.raises(ValidationError, match=r"minibatch_size \(2\) is below resources.ranks \(4\)"):
        PPOConfig(rollout_batch_size=8, minibatch_size=2, resources={"ranks": {"critic": 4}})
    with pytest.raises(ValidationError, match=r"micro_batch_size \(2\) is below the policy's ranks \(4\)"):
        RejectionSamplingConfig(micro_batch_size=2, resources={"ranks": {"policy": 4}})
