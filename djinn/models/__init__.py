"""Model families as explicit stacks on flat varlen batches, and their loaders."""
from .config import ModelConfig
from .gpt2 import GPT2Model
from .llama import LlamaModel

FAMILIES = {"llama": LlamaModel, "gpt2": GPT2Model}


def build_model(cfg: ModelConfig):
    """An uninitialised model of the config's family (weights come from a loader)."""
    return FAMILIES[cfg.family](cfg)


__all__ = ["ModelConfig", "GPT2Model", "LlamaModel", "build_model", "FAMILIES"]
