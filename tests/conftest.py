import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_MODELS = Path(os.environ.get("DJINN_SHARED_MODELS", ROOT.parent / "shared" / "models"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def shared_model(name: str) -> Path:
    path = SHARED_MODELS / name
    if not path.exists():
        pytest.fail(f"the shared test checkpoints are missing: {path} (set DJINN_SHARED_MODELS)")
    return path


@pytest.fixture(scope="session")
def stories_path() -> Path:
    return shared_model("stories260K")
