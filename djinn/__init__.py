"""Djinn: a white-box LLM inference server. Pause any session mid-forward at any layer, read and edit the
activation, resume, while every other session keeps running on the same batched engine."""
from .client import Checkpoint, Client, Session, connect
from .client.api import Item, RunResults, Stacked
from .errors import *  # noqa: F401,F403  (every typed error is part of the public API)
from .errors import DjinnError
from .events import Done, Error, GenerateResult, LensResult, ModelInfo, ParameterInfo, Paused, Token, TopTokens
from .interventions import Ablate, Breakpoint, Capture, LogitLens, Replace, Scale, Steer
from .sites import SiteInfo

__version__ = "0.1.0"

__all__ = ["connect", "Client", "Session", "Checkpoint", "DjinnError", "Token", "Paused", "Done", "Error",
           "GenerateResult", "ModelInfo", "ParameterInfo", "SiteInfo", "TopTokens", "LensResult", "Steer", "Scale",
           "Replace", "Ablate", "Capture", "LogitLens", "Breakpoint", "Item", "RunResults", "Stacked"]
