"""corral: a Llama 2 family model through its whole life on Ray."""

from corral.checkpoint import export_hf, load_model, load_tokenizer, save_model
from corral.config import ModelConfig
from corral.model import Transformer
from corral.reward import load_reward_model

__all__ = ["ModelConfig", "Transformer", "export_hf", "load_model", "load_reward_model", "load_tokenizer",
           "save_model"]
