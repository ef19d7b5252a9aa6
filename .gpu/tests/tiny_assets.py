"""Tiny real files of every kind the tools read, for the bad-input and fuzz tests.

    from tiny_assets import build_assets
    a = build_assets(tmp_dir)   # {"model", "tokenizer", "rwkve", "bundle", "state", "onnx", "other_model", ...}

Everything is built from a random 2-layer RWKV-7 (tests/checkpoints.py) with a byte-level
tokenizer.json of 257 ids written here, so nothing from ../shared is needed and the whole set
takes a few seconds: model .pth (+ tokenizer.json beside it), the converted model file, a 2-bit
predictor bundle fitted on 256 tokens, a saved chat state, a dense ONNX export; and a second
model (another fingerprint) with its own bundle and state.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from checkpoints import make_checkpoint

VOCAB = 260          # >= the 257 ids of the byte-level tokenizer


def make_byte_tokenizer(path) -> Path:
    """A byte-level BPE tokenizer.json with no merges: id 0 <|endoftext|>, ids 1..256 the bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0, **{ch: i + 1 for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    path = Path(path)
    tok.save(str(path))
    return path


def _model_dir(d: Path, seed: int) -> tuple:
    d.mkdir(parents=True, exist_ok=True)
    pth = make_checkpoint("x070", d / "m.pth", n_layer=2, n_embd=64, vocab_size=VOCAB, seed=seed)
    make_byte_tokenizer(d / "tokenizer.json")
    from rwkv_edge import load_model
    return pth, load_model(str(pth), backend="reference")


def _bundle(model, d: Path) -> Path:
    from rwkv_edge.predictors.collect import collect
    from rwkv_edge.predictors.fit import fit

    toks = np.random.default_rng(0).integers(1, 257, 256).tolist()
    collect(model, toks, d / "act", progress=False, shard_rows=512)
    bundle = fit(model, str(d / "act"), kind="quantized", bits=2, progress=False)
    out = d / "q2.npz"
    bundle.save(str(out))
    return out


def _state(model, d: Path) -> Path:
    _, st = model.forward([0, 5, 9, 12])
    out = d / "state.npz"
    st.save(str(out), fingerprint=model.fingerprint)
    return out


def build_assets(root) -> dict:
    """Build every asset under `root` (a fresh directory); returns {name: path string}."""
    from rwkv_edge.export.export import export_onnx
    from rwkv_edge.modelfile import convert

    root = Path(root)
    pth, model = _model_dir(root / "model", seed=0)
    other_pth, other = _model_dir(root / "other", seed=1)
    a = {"model": pth, "tokenizer": root / "model" / "tokenizer.json",
         "rwkve": Path(convert(str(pth), str(root / "model" / "m.rwkve"), "fp16")),
         "bundle": _bundle(model, root / "model"), "state": _state(model, root / "model"),
         "other_model": other_pth, "other_bundle": _bundle(other, root / "other"),
         "other_state": _state(other, root / "other"),
         "onnx": export_onnx(model, root / "onnx", "fp32", tokenizer=str(root / "model" / "tokenizer.json"),
                             prefill=False)}
    text = root / "text.txt"
    text.write_text("The old man looked at the sea. " * 40)
    a["text"] = text
    binary = root / "binary.txt"
    binary.write_bytes(b"hello \xff\xfe\x00\x81 world\n" * 20)
    a["binary"] = binary
    rnd = root / "random.bin"
    rnd.write_bytes(np.random.default_rng(0).bytes(4096))
    a["random"] = rnd
    return {k: os.fspath(v) for k, v in a.items()}
