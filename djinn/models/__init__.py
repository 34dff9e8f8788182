"""Model families as explicit stacks on flat varlen batches, and their loaders."""
from .config import ModelConfig
from .gpt2 import GPT2Model
from .decoder import DecoderModel

FAMILIES = {"llama": DecoderModel, "gpt2": GPT2Model}


def build_model(cfg: ModelConfig):
    """An uninitialised model of the config's family (weights come from a loader)."""
    return FAMILIES[cfg.family](cfg)


__all__ = ["ModelConfig", "GPT2Model", "DecoderModel", "build_model", "FAMILIES"]
