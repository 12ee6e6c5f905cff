"""Reward models: the margin ranking loss by hand, the scalar head read at the last token, save/load."""

import math

import pytest
import torch

from corral import load_reward_model
from corral.config import ModelConfig
from corral.data.sft import encode_dialog
from corral.model import Transformer
from corral.reward import RewardModel, pad_batch, pairwise_metrics, save_reward_model
from corral.train.losses import margin_of, ranking_loss

# -log sigmoid(1 - m) = log(1 + e^(m - 1)) for a reward gap of exactly 1
HAND = {
    ("large", "significantly_better"): 2.1269280110429727,  # m = 3: log(1 + e^2)
    ("large", "better"): 1.3132616875182228,  # m = 2: log(1 + e)
    ("large", "slightly_better"): 0.6931471805599453,  # m = 1: log 2
    ("large", "negligibly_better"): 0.31326168751822286,  # m = 0: log(1 + e^-1)
    ("small", "significantly_better"): 0.6931471805599453,  # m = 1
    ("small", "better"): 0.5403055746894084,  # m = 2/3: log(1 + e^(-1/3))
    ("small", "slightly_better"): 0.41437008685207205,  # m = 1/3: log(1 + e^(-2/3))
    ("small", "negligibly_better"): 0.31326168751822286,  # m = 0
    **{("none", r): 0.31326168751822286 for r in
       ("significantly_better", "better", "slightly_better", "negligibly_better")},
}


@pytest.mark.parametrize("setting, rating", list(HAND))
def test_margin_loss_by_hand(setting, rating):
    chosen, rejected = torch.tensor([0.5]), torch.tensor([-0.5])
    loss = ranking_loss(chosen, rejected, margin_of([rating], setting))
    assert loss.item() == pytest.approx(HAND[setting, rating], rel=1e-6)


def test_margin_loss_averages_pairs_and_rejects_unknown_ratings():
    ratings = ["significantly_better", "negligibly_better"]
    loss = ranking_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]), margin_of(ratings, "large"))
    # pair 1: gap 2, m 3 -> log(1 + e^1); pair 2: gap -1, m 0 -> log(1 + e^1)
    assert loss.item() == pytest.approx(math.log1p(math.e), rel=1e-6)
    with pytest.raises(ValueError, match="unknown rating 'great'"):
        margin_of(["great"], "large")
    with pytest.raises(ValueError, match="unknown margin setting"):
        margin_of(["better"], "huge")


def test_pairwise_metrics():
    m = pairwise_metrics([1.0, 2.0, 0.0, 3.0], [0.0, 2.5, -1.0, 1.0],
                         ["better", "better", "slightly_better", "significantly_better"])
    assert m["accuracy"] == 0.75 and m["accuracy_better"] == 0.5
    assert m["accuracy_slightly_better"] == 1.0 and m["accuracy_significantly_better"] == 1.0
    assert m["reward_gap"] == pytest.approx((1 - 0.5 + 1 + 2) / 4)
    assert "accuracy_negligibly_better" not in m


CONFIG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=4096, multiple_of=16, max_seq_len=64)


def test_reward_is_read_at_the_last_token():
    torch.manual_seed(0)
    rm = RewardModel.from_lm(Transformer(CONFIG).init_weights(seed=1))
    torch.nn.init.normal_(rm.output.weight)
    tokens, lengths = pad_batch([[1, 5, 9, 2], [1, 7, 2]])
    assert tokens.tolist() == [[1, 5, 9, 2], [1, 7, 2, 0]] and lengths.tolist() == [4, 3]
    r = rm(tokens, lengths)
    assert r.shape == (2,)
    alone = rm(torch.tensor([[1, 7, 2]]), torch.tensor([3]))
    torch.testing.assert_close(r[1:], alone)  # padding after the last token changes nothing
    tokens[1, 3] = 99
    torch.testing.assert_close(rm(tokens, lengths), r)
    # the value is the head applied to the final hidden state of the last token
    hidden = {}
    rm.norm.register_forward_hook(lambda mod, inp, out: hidden.setdefault("h", out))
    rm(torch.tensor([[1, 5, 9, 2]]), torch.tensor([4]))
    torch.testing.assert_close(r[:1], hidden["h"][:, -1] @ rm.output.weight[0])


def test_from_lm_keeps_every_weight_but_the_head():
    lm = Transformer(CONFIG).init_weights(seed=2)
    rm = RewardModel.from_lm(lm)
    for name, p in lm.state_dict().items():
        if name != "output.weight":
            torch.testing.assert_close(rm.state_dict()[name], p)
    assert rm.output.weight.shape == (1, CONFIG.dim) and not rm.output.weight.any()


def test_save_load_and_score(tmp_path, tokenizer):
    rm = RewardModel.from_lm(Transformer(CONFIG).init_weights(seed=3))
    torch.nn.init.normal_(rm.output.weight, generator=torch.Generator().manual_seed(0))
    rm.tokenizer = tokenizer
    dialog = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    wrong = [dialog[0], {"role": "assistant", "content": "7"}]
    save_reward_model(rm, tmp_path / "rm")
    loaded = load_reward_model(tmp_path / "rm")
    ids = encode_dialog(tokenizer, dialog)[0]
    expected = rm(torch.tensor([ids]), torch.tensor([len(ids)])).item()
    assert loaded.score(dialog) == pytest.approx(expected, rel=1e-5)
    assert loaded.score_batch([dialog, wrong]) == pytest.approx([loaded.score(dialog), loaded.score(wrong)], rel=1e-5)
    assert loaded.score(dialog) != pytest.approx(loaded.score(wrong))


def test_load_reward_model_refuses_a_language_model(tmp_path):
    from corral.checkpoint import CheckpointError, save_model

    save_model(Transformer(CONFIG), tmp_path / "lm")
    with pytest.raises(CheckpointError, match="not a reward model"):
        load_reward_model(tmp_path / "lm")
