import shutil
from pathlib import Path

import pytest

from rwkv_edge.tokenizer import (
    DEFAULT_WORLD_VOCAB,
    HFTokenizer,
    StreamDecoder,
    TokenizerError,
    WorldTokenizer,
    load_tokenizer,
)

HF_JSON = Path(__file__).resolve().parents[1] / "rwkv_edge" / "data" / "default" / "tokenizer.json"

TEXTS = {
    "ascii": "The quick brown fox jumps over the lazy dog. It was 3:45 pm, and 99% of it was done!",
    "code": "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n\treturn -x\n\n\nprint(f(3))\r\n",
    "accents": "Café crème, naïve façade; Über Grüße; mañana, niño, señor. Ærøskøbing ß",
    "cjk": "中文分词测试，你好世界。日本語のテキストです。한국어 문장",
    "emoji": "🙂👍🏽 family: 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 ✨",
    "mixed": "Hello 世界 🙂! naïve\tcafé\n\n  spaces   and 日本語 👍🏽 end\x00\x7f",
    "empty": "",
    "whitespace": " \n\n\t   \n",
}


@pytest.fixture(scope="module")
def world():
    return WorldTokenizer()


@pytest.fixture(scope="module")
def hf():
    if not HF_JSON.is_file():
        pytest.skip(f"HF tokenizer not found at {HF_JSON} (the embedded model package is missing)")
    return HFTokenizer(HF_JSON)


# ---------------------------------------------------------------- World


def test_world_basics(world):
    assert world.vocab_size == 65536
    assert world.eos_id == 0
    assert world.decode([0]) == ""
    assert world.decode_bytes([]) == b""


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_world_matches_reference(world, name):
    rwkv_tok = pytest.importorskip("rwkv.rwkv_tokenizer", reason="reference `rwkv` package not installed")
    import rwkv

    ref_vocab = Path(rwkv.__file__).resolve().parent / "rwkv_vocab_v20230424.txt"
    ref = _reference(str(ref_vocab), rwkv_tok)
    text = TEXTS[name]
    assert world.encode(text) == ref.encode(text)


_REF_CACHE = {}


def _reference(path, mod):
    if path not in _REF_CACHE:
        _REF_CACHE[path] = mod.TRIE_TOKENIZER(path)
    return _REF_CACHE[path]


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_world_round_trip(world, name):
    text = TEXTS[name]
    ids = world.encode(text)
    assert all(0 < i < world.vocab_size for i in ids)
    assert world.decode(ids) == text
    assert world.decode_bytes(ids) == text.encode("utf-8")


def test_world_partial_utf8_is_replaced(world):
    ids = world.encode("🙂")
    data = world.decode_bytes(ids)
    assert len(data) == 4
    # Any prefix that cuts the character decodes with U+FFFD instead of raising.
    ids_bytes = world.encode_bytes(data[:2])
    assert world.decode(ids_bytes) == "\ufffd"


def test_world_out_of_range_id(world):
    with pytest.raises(TokenizerError):
        world.decode([70000])
    with pytest.raises(TokenizerError):
        world.decode([5, -1])


def test_world_bad_vocab_line(tmp_path):
    bad = tmp_path / "vocab.txt"
    bad.write_text("1 'ab' 3\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="2 bytes"):
        WorldTokenizer(bad)
    bad.write_text("1 __import__('os') 1\n", encoding="utf-8")
    with pytest.raises(TokenizerError):
        WorldTokenizer(bad)


def test_world_speed(world):
    import time

    text = (TEXTS["ascii"] + TEXTS["code"] + TEXTS["cjk"] + TEXTS["emoji"]) * 1500  # ~0.5 MB
    t0 = time.perf_counter()
    ids = world.encode(text)
    assert time.perf_counter() - t0 < 5.0
    assert world.decode(ids) == text


# ---------------------------------------------------------------- HF


def test_hf_matches_tokenizers(hf):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(HF_JSON))
    assert hf.vocab_size == 16384
    for text in (TEXTS["ascii"], TEXTS["code"], "She said, \"Well, I never!\" and left.\n\nChapter II"):
        ids = hf.encode(text)
        assert ids == raw.encode(text).ids
        assert hf.decode(ids) == text
        assert hf.decode_bytes(ids) == text.encode("utf-8")


def test_hf_decode_bytes_matches_decode(hf):
    for text in TEXTS.values():
        ids = hf.encode(text)
        assert hf.decode_bytes(ids).decode("utf-8", errors="replace") == hf.decode(ids)


# ---------------------------------------------------------------- StreamDecoder

STREAM_TEXTS = [TEXTS["mixed"], TEXTS["emoji"], TEXTS["cjk"], TEXTS["accents"] + "\n" + TEXTS["code"]]


def _stream(tok, ids, **kw):
    sd = StreamDecoder(tok, **kw)
    pieces = [sd.push(i) for i in ids]
    for p in pieces:
        assert "\ufffd" not in p
    return "".join(pieces) + sd.flush()


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_world(world, text):
    ids = world.encode(text)
    assert _stream(world, ids) == world.decode(ids) == text


@pytest.mark.parametrize("byte_exact", [None, False])
@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_hf(hf, text, byte_exact):
    ids = hf.encode(text)
    assert _stream(hf, ids, byte_exact=byte_exact) == hf.decode(ids)


def test_stream_holds_back_partial_character(world):
    sd = StreamDecoder(world)
    data = "🙂".encode("utf-8")
    ids = [world.encode_bytes(data[i : i + 1])[0] for i in range(4)]
    assert [sd.push(i) for i in ids] == ["", "", "", "🙂"]
    # A dangling partial character is flushed as U+FFFD, then the decoder starts fresh.
    sd.push(ids[0])
    assert sd.flush() == "\ufffd"
    assert sd.push(world.encode("a")[0]) == "a"


# ---------------------------------------------------------------- load_tokenizer


def test_load_explicit(tmp_path, hf):
    assert isinstance(load_tokenizer("world", "x.pth", 65536), WorldTokenizer)
    assert isinstance(load_tokenizer(str(HF_JSON), "x.pth", 16384), HFTokenizer)
    vocab = tmp_path / "vocab.txt"
    shutil.copy(DEFAULT_WORLD_VOCAB, vocab)
    tok = load_tokenizer(str(vocab), "x.pth", 65536)
    assert isinstance(tok, WorldTokenizer) and tok.encode("hi 🙂") == WorldTokenizer().encode("hi 🙂")


def test_load_missing_path(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(TokenizerError, match="nope.json"):
        load_tokenizer(str(missing), "x.pth", 65536)
    with pytest.raises(TokenizerError, match="nope.txt"):
        load_tokenizer(str(tmp_path / "nope.txt"), "x.pth", 65536)
    assert issubclass(TokenizerError, ValueError)


def test_load_json_next_to_model(tmp_path, hf):
    shutil.copy(HF_JSON, tmp_path / "tokenizer.json")
    tok = load_tokenizer(None, str(tmp_path / "model.pth"), 16384)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 16384


def test_load_world_fallback(tmp_path):
    tok = load_tokenizer(None, str(tmp_path / "model.pth"), 65536)
    assert isinstance(tok, WorldTokenizer)


def test_load_no_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match="--tokenizer"):
        load_tokenizer(None, str(tmp_path / "model.pth"), 16384)


def test_load_vocab_too_large(hf):
    with pytest.raises(TokenizerError, match="vocab size"):
        load_tokenizer("world", "x.pth", 16384)
    with pytest.raises(TokenizerError, match="vocab size"):
        load_tokenizer(str(HF_JSON), "x.pth", 8000)
