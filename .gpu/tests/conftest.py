"""Shared fixtures: tiny random checkpoints built by the tests, and the models in ../shared."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checkpoints import make_checkpoint  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
REF_MODEL = SHARED / "models" / "rwkv7-ref-58m.pth"
# the project's BPE tokenizer (16384 ids) ships with the embedded default model: always present
TOKENIZER_JSON = Path(__file__).resolve().parents[1] / "rwkv_edge" / "data" / "default" / "tokenizer.json"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """Factory: tiny_ckpt(version) -> path of a random 2-layer checkpoint (cached per session)."""
    cache = {}

    def make(version="x070", **kw):
        key = (version, tuple(sorted(kw.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(f"ckpt_{version}")
            cache[key] = str(make_checkpoint(version, d / "tiny.pth", **kw))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def ref_model_path():
    if not REF_MODEL.exists():
        pytest.skip(f"reference model not present at {REF_MODEL}")
    return str(REF_MODEL)


@pytest.fixture(scope="session")
def bad_input_assets(tmp_path_factory):
    """Tiny real files of every kind (model, model file, bundle, state, ONNX export, ...): tiny_assets.py."""
    from tiny_assets import build_assets

    return build_assets(tmp_path_factory.mktemp("assets"))
