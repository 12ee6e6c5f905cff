"""Reward models (Llama 2, section 3.2.2): the transformer with a scalar head instead of the LM head.

The reward of a (prompt, answer) dialog is the head's value at its last token, the EOS that ends
the answer. Training (`corral.train.reward`) uses the margin ranking loss of
`corral.train.losses`.

A reward checkpoint is a corral checkpoint directory whose `corral.json` says `"head": "reward"`;
its `output.weight` is (1, dim), written as Hugging Face's `LlamaForSequenceClassification`
`score.weight`. `load_reward_model(path)` gives the model that PPO, rejection sampling and
evaluation score with.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from corral.checkpoint import CORRAL_CONFIG, CheckpointError, WeightReader, load_tokenizer, save_model
from corral.config import ModelConfig
from corral.model import Layout, Transformer, WeightSource, fill_parameters, flat_slice
from corral.tokenizer import Tokenizer
from corral.train.losses import RATINGS

def pairwise_metrics(chosen: Sequence[float], rejected: Sequence[float], ratings: Sequence[str]) -> dict:
    """Pairwise accuracy (chosen scored above rejected) overall and per rating, and the mean gap."""
    c, r = torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64)
    right = (c > r).double()
    out = {"accuracy": right.mean().item(), "reward_gap": (c - r).mean().item()}
    for rating in RATINGS:
        sel = torch.tensor([x == rating for x in ratings], dtype=torch.bool)
        if sel.any():
            out[f"accuracy_{rating}"] = right[sel].mean().item()
    return out


def branch_layout(branches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (bsz, seqlen) and mask (bsz, 1, seqlen, seqlen) of rows that hold one prompt and
    several answers to it: `branches` is 0 on the shared prompt and k on answer k (right padding
    continues the last answer). Each answer sees the prompt and itself, at the positions it would
    have alone, so a reward model reads every answer's reward as if it had been scored on its own.
    """
    n_branches = int(branches.max()) + 1  # sync: a few branches, read on the host
    own = torch.nn.functional.one_hot(branches.long(), n_branches)  # (bsz, seqlen, n_branches)
    index = (own.cumsum(1) * own).sum(-1) - 1  # each token's index within its own branch
    prompt_len = (branches == 0).sum(1, keepdim=True)
    positions = torch.where(branches == 0, index, prompt_len + index)
    seqlen = branches.shape[1]
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=branches.device).tril()
    visible = (branches[:, None, :] == 0) | (branches[:, :, None] == branches[:, None, :])
    return positions, (visible & causal)[:, None]


class RewardModel(Transformer):
    """Llama 2 whose `output` projects to one scalar instead of the vocabulary.

    Keeps Meta's parameter names, so an SFT checkpoint loads into everything but the head.
    """

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.output = nn.Linear(config.dim, 1, bias=False)
        self.tokenizer: Tokenizer | None = None

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor, branches: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (bsz, seqlen), right-padded; lengths (bsz,) -> rewards (bsz,), read at the last token.

        With `branches` (rows of one prompt and k answers, see `branch_layout`), `lengths`
        (bsz, k) is where each answer ends in its row, and the rewards are (bsz, k).
        """
        layout = None if branches is None else Layout(*branch_layout(branches))
        values = super().forward(tokens, layout)[..., 0]  # (bsz, seqlen)
        ends = lengths.long() if branches is not None else lengths.long()[:, None]
        rewards = values.gather(1, ends - 1)
        return rewards if branches is not None else rewards.squeeze(1)

    @classmethod
    def from_lm(cls, lm: Transformer) -> "RewardModel":
        """A reward model from an in-memory language model (`RewardInit`)."""
        rm = cls(lm.config)
        state = lm.state_dict()
        fill_parameters(rm, RewardInit(lambda name, shape: state[name]))
        return rm

    # -- scoring -----------------------------------------------------------------------------
    @torch.no_grad()
    def score_batch(self, dialogs: Sequence[Sequence[dict]], batch_size: int = 32) -> list[float]:
        """Rewards of finished dialogs (each ending with the assistant's answer to score)."""
        from corral.data.sft import encode_dialog

        if self.tokenizer is None:
            raise ValueError("this reward model has no tokenizer; load it with corral.load_reward_model")
        self.eval()
        device = self.output.weight.device
        encoded = [encode_dialog(self.tokenizer, d)[0][-self.config.max_seq_len:] for d in dialogs]
        out: list[float] = []
        for i in range(0, len(encoded), batch_size):
            chunk = encoded[i:i + batch_size]
            tokens, lengths = pad_batch(chunk)
            out += self(tokens.to(device), lengths.to(device)).float().tolist()
        return out

    def score(self, messages: Sequence[dict]) -> float:
        """The reward of one finished dialog: prompt turns, then the answer to score."""
        return self.score_batch([messages])[0]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into (bsz, max_len) and return their lengths (bsz,)."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    tokens = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return tokens, lengths


def save_reward_model(model: RewardModel, out_dir: str | os.PathLike, metadata: dict | None = None) -> Path:
    return save_model(model, out_dir, tokenizer=model.tokenizer, metadata=metadata, head="reward")


def reward_checkpoint(path: str | os.PathLike) -> WeightReader:
    """The weights of a reward checkpoint written by the reward step; raises if it is not one."""
    weights = WeightReader(path)
    if weights.head != "reward":
        raise CheckpointError(f"{path}: not a reward model (its {CORRAL_CONFIG} has no \"head\": \"reward\"); "
                              f"train one with pipelines/steps/reward.py")
    return weights


def load_reward_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> RewardModel:
    """A reward checkpoint written by the reward step, ready to `score(messages)`."""
    weights = reward_checkpoint(path)
    model = RewardModel(weights.config)
    weights.check(name for name, _ in model.named_parameters())
    fill_parameters(model, weights)
    model.tokenizer = load_tokenizer(path)
    return model.to(dtype).eval()


class RewardInit:
    """A language model's weights for a new reward model: every weight but the head, which starts
    at zero (all rewards start equal: the first steps see the plain margin loss)."""

    def __init__(self, lm: WeightSource):
        self.lm = lm

    def __call__(self, name: str, shape: torch.Size) -> torch.Tensor:
        return torch.zeros(shape) if name == "output.weight" else self.lm(name, shape)

    def slice(self, name: str, shape: torch.Size, start: int, end: int) -> torch.Tensor:
        return torch.zeros(end - start) if name == "output.weight" else flat_slice(self.lm, name, shape, start, end)


def reward_init(path: str | os.PathLike) -> WeightSource:
    """A new reward model's weights from any checkpoint `corral.load_model` reads (the SFT model),
    read tensor by tensor: the language model is never loaded as a model of its own."""
    return RewardInit(WeightReader(path))
