from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODELS = ROOT.parent / "shared" / "models"
MODELS = ROOT / "models"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def reference() -> dict:
    """Independently computed figures for the shared VNN-COMP networks (see shared/models/README.md)."""
    return json.loads((SHARED_MODELS / "reference.json").read_text())


def shared_model_files() -> list[str]:
    return sorted(p.name for p in (SHARED_MODELS / "vnncomp2021").glob("*.onnx"))
