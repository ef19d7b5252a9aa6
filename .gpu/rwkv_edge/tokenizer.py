"""Tokenizers: the RWKV World vocab (greedy longest match over a byte trie) and HF ``tokenizer.json``.

Every tokenizer here has the same small surface: ``encode(text) -> list[int]``,
``decode(ids) -> str``, ``decode_bytes(ids) -> bytes``, ``vocab_size`` and ``eos_id``.
``StreamDecoder`` turns a stream of ids into text without ever emitting half a character.
"""
from __future__ import annotations

import ast
import codecs
import functools
import json
from pathlib import Path
from typing import Iterable, Sequence

__all__ = [
    "TokenizerError",
    "WorldTokenizer",
    "HFTokenizer",
    "StreamDecoder",
    "load_tokenizer",
    "DEFAULT_WORLD_VOCAB",
    "WORLD_VOCAB_SIZE",
]

DEFAULT_WORLD_VOCAB = Path(__file__).resolve().parent / "data" / "rwkv_vocab_v20230424.txt"
# World models pad the embedding to 65536 rows; the vocab file itself uses ids 1..65529.
WORLD_VOCAB_SIZE = 65536

_LEAF = 256  # key under which a trie node stores its token id (byte keys are 0..255)


class TokenizerError(ValueError):
    """A tokenizer file is missing or malformed, or does not fit the model."""


def _join_table(table: list[bytes], ids: Iterable[int]) -> bytes:
    # Negative ids would silently index from the end of the list, so reject them explicitly.
    ids = list(ids)
    try:
        if ids and min(ids) < 0:
            raise IndexError
        return b"".join([table[i] for i in ids])
    except (IndexError, TypeError):
        bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < len(table))]
        raise TokenizerError(f"token id(s) out of range [0, {len(table)}): {bad[:5]}") from None


# --------------------------------------------------------------------------- RWKV World


@functools.lru_cache(maxsize=4)
def _read_world_vocab(path: str) -> tuple[tuple[int, bytes], ...]:
    """Parse a World vocab file into (id, token bytes) pairs; cached because parsing takes ~0.3 s."""
    entries = []
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            try:
                first, last = line.index(" "), line.rindex(" ")
                idx = int(line[:first])
                tok = ast.literal_eval(line[first + 1 : last])
                length = int(line[last + 1 :])
            except (ValueError, SyntaxError) as e:
                raise TokenizerError(f"{path}:{lineno}: cannot parse vocab line ({e})") from None
            if isinstance(tok, str):
                tok = tok.encode("utf-8")
            if not isinstance(tok, bytes):
                raise TokenizerError(f"{path}:{lineno}: token is not a str or bytes literal")
            if len(tok) != length:
                raise TokenizerError(
                    f"{path}:{lineno}: token has {len(tok)} bytes but the line says {length}"
                )
            entries.append((idx, tok))
    if not entries:
        raise TokenizerError(f"{path}: empty vocab file")
    return tuple(entries)


class WorldTokenizer:
    """RWKV World tokenizer: greedy longest match of the UTF-8 bytes over the vocab's byte trie.

    ``vocab_file`` defaults to the bundled ``rwkv_vocab_v20230424.txt``. ``vocab_size`` is
    65536 for that file (World models pad their embedding to 65536) and ``max id + 1`` for
    other files unless given. Id 0 is end-of-text and decodes to nothing.
    """

    eos_id = 0

    def __init__(self, vocab_file: str | Path | None = None, vocab_size: int | None = None):
        path = Path(vocab_file) if vocab_file is not None else DEFAULT_WORLD_VOCAB
        if not path.is_file():
            raise TokenizerError(f"tokenizer vocab file not found: {path}")
        self.path = path
        try:
            entries = _read_world_vocab(str(path.resolve()))
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{path}: not a UTF-8 World vocab file (invalid byte near byte {e.start})") from None
        max_id = max(i for i, _ in entries)
        if vocab_size is None:
            vocab_size = WORLD_VOCAB_SIZE if path.resolve() == DEFAULT_WORLD_VOCAB else max_id + 1
        if vocab_size <= max_id:
            raise TokenizerError(f"vocab_size {vocab_size} is too small for ids up to {max_id} in {path}")
        self.vocab_size = vocab_size

        # id -> bytes as a list (ids not in the file, like 0, decode to b"").
        self._id2bytes: list[bytes] = [b""] * vocab_size
        # Trie as nested dicts: node[byte] -> child node, node[_LEAF] -> token id.
        # Dict lookups keep the inner loop of encode() to a few bytecodes per input byte.
        root: dict = {}
        for idx, tok in entries:
            if idx < 0:
                raise TokenizerError(f"{path}: negative token id {idx}")
            self._id2bytes[idx] = tok
            node = root
            for b in tok:
                nxt = node.get(b)
                if nxt is None:
                    nxt = node[b] = {}
                node = nxt
            node[_LEAF] = idx
        self._root = root

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids for raw bytes (greedy longest match)."""
        root, leaf = self._root, _LEAF
        out: list[int] = []
        append = out.append
        i, n = 0, len(data)
        while i < n:
            node = root
            j = i
            best = -1
            end = i
            while j < n:
                node = node.get(data[j])
                if node is None:
                    break
                j += 1
                tid = node.get(leaf)
                if tid is not None:
                    best, end = tid, j
            if best < 0:
                raise TokenizerError(f"byte {data[i]:#04x} at offset {i} is not in the vocab")
            append(best)
            i = end
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids for ``text`` (encoded as UTF-8)."""
        return self.encode_bytes(text.encode("utf-8"))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Concatenated bytes of ``ids``; may end in the middle of a UTF-8 character."""
        return _join_table(self._id2bytes, ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"WorldTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------- HF tokenizer.json


def _byte_level_alphabet() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode map: printable stand-in character -> byte value."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = {b: b for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in chars.items()}


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (via the ``tokenizers`` package) with the same API.

    For byte-level BPE (decoder type ``ByteLevel``) ``decode_bytes`` returns the exact bytes of
    the tokens, so a character split over several tokens streams correctly; for other decoders
    it falls back to ``decode(ids).encode()``. Special tokens are skipped when decoding.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - tokenizers is a dependency
            raise TokenizerError(f"the 'tokenizers' package is needed to read {path}") from e
        try:
            self._tok = Tokenizer.from_file(str(path))
            spec = json.loads(path.read_text(encoding="utf-8"))
        except Exception as e:
            raise TokenizerError(f"cannot load tokenizer {path}: {e}") from None
        self.path = path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eos = None
        for name in ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"):
            eos = self._tok.token_to_id(name)
            if eos is not None:
                break
        self.eos_id = 0 if eos is None else eos

        # Exact byte decoding for byte-level BPE: token string -> bytes through the GPT-2 alphabet.
        decoder = spec.get("decoder") or {}
        self.byte_level = decoder.get("type") == "ByteLevel"
        self._id2bytes: list[bytes] | None = None
        if self.byte_level:
            inv = _byte_level_alphabet()
            special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
            added = {t["id"]: t["content"] for t in spec.get("added_tokens", [])}
            table = [b""] * self.vocab_size
            for tok, idx in self._tok.get_vocab(with_added_tokens=True).items():
                if idx in special:
                    continue
                if idx in added:
                    table[idx] = added[idx].encode("utf-8")
                elif all(c in inv for c in tok):
                    table[idx] = bytes(inv[c] for c in tok)
                else:  # not a byte-level token after all: give up on the exact path
                    self.byte_level = False
                    break
            if self.byte_level:
                self._id2bytes = table

    def encode(self, text: str) -> list[int]:
        """Token ids for ``text`` (``Tokenizer.encode(text).ids``)."""
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens skipped)."""
        return self._tok.decode(list(ids))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Bytes of ``ids``; exact per-token bytes for byte-level BPE, else ``decode(ids).encode()``."""
        if self._id2bytes is None:
            return self.decode(list(ids)).encode("utf-8")
        return _join_table(self._id2bytes, ids)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------- streaming


class StreamDecoder:
    """Incremental detokenizer: ``push(id)`` returns the text completed by that token.

    Two strategies, chosen from the tokenizer:
    - byte-exact (``WorldTokenizer``, byte-level ``HFTokenizer``): token bytes go through an
      incremental UTF-8 decoder, which holds back an incomplete trailing character. O(1) per token.
    - text diff (other HF decoders): decode ``context + pending`` and emit what goes beyond
      ``decode(context)``, unless it ends in U+FFFD (a character still incomplete). ``context`` is
      the last emitted token, so the decoder's spacing rules see a neighbour, and ``pending`` is
      cleared after each emit: the work per token is bounded by the pending tail, O(n) overall.
    Concatenating every ``push`` result and ``flush()`` gives ``tokenizer.decode(all_ids)``.
    ``byte_exact`` forces a strategy (None: byte-exact when the tokenizer supports it).
    """

    def __init__(self, tokenizer, byte_exact: bool | None = None):
        self.tokenizer = tokenizer
        if byte_exact is None:
            byte_exact = isinstance(tokenizer, WorldTokenizer) or bool(getattr(tokenizer, "byte_level", False))
        self._exact = byte_exact
        self.reset()

    def reset(self) -> None:
        """Forget everything pushed so far."""
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._context: list[int] = []
        self._pending: list[int] = []
        self._first = True

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly "")."""
        if self._exact:
            return self._utf8.decode(self.tokenizer.decode_bytes([token_id]))
        self._pending.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Return whatever is still held back (incomplete characters become U+FFFD) and reset."""
        if self._exact:
            out = self._utf8.decode(b"", final=True)
        else:
            out = self._emit(final=True)
        self.reset()
        return out

    def _emit(self, final: bool) -> str:
        if not self._pending:
            return ""
        dec = self.tokenizer.decode
        if self._first:
            # The first pieces are decoded with no context so they match decode(all)[:k].
            text = dec(self._pending)
            prefix_len = 0
        else:
            prefix_len = len(dec(self._context))
            text = dec(self._context + self._pending)
        new = text[prefix_len:]
        if not final and (not new or new.endswith("\ufffd")):
            return ""
        self._context = self._pending[-1:]
        self._pending = []
        self._first = False
        return new


# --------------------------------------------------------------------------- resolution


def load_tokenizer(tokenizer: str | None, model_path: str | Path, vocab_size: int):
    """Pick the tokenizer for a model.

    ``tokenizer``: ``"world"`` (bundled World vocab), a ``.json`` path (HF tokenizer) or a ``.txt``
    path (World-format vocab file). ``None``: ``tokenizer.json`` next to the model file if present,
    else the World tokenizer when ``vocab_size == 65536``, else ``TokenizerError``. Also raises
    ``TokenizerError`` for missing files and when the tokenizer has more ids than the model.
    """
    if tokenizer is not None:
        if tokenizer.lower() == "world":
            tok = WorldTokenizer()
        else:
            path = Path(tokenizer).expanduser()
            if not path.is_file():
                raise TokenizerError(f"tokenizer file not found: {path}")
            suffix = path.suffix.lower()
            if suffix == ".json":
                tok = HFTokenizer(path)
            elif suffix == ".txt":
                tok = WorldTokenizer(path)
            else:
                raise TokenizerError(
                    f"unknown tokenizer {tokenizer!r}: expected 'world', a tokenizer.json or a World vocab .txt"
                )
    else:
        mp = Path(model_path).expanduser().resolve()
        candidate = (mp if mp.is_dir() else mp.parent) / "tokenizer.json"      # a package holds its own
        if candidate.is_file():
            tok = HFTokenizer(candidate)
        elif vocab_size == WORLD_VOCAB_SIZE:
            tok = WorldTokenizer()
        else:
            raise TokenizerError(
                f"no tokenizer found for {model_path} (vocab size {vocab_size}, no tokenizer.json next to it); "
                "pass --tokenizer world|PATH/tokenizer.json|PATH/vocab.txt"
            )
    if tok.vocab_size > vocab_size:
        raise TokenizerError(
            f"tokenizer {tok!r} has {tok.vocab_size} ids but the model's vocab size is only {vocab_size}; "
            "pass the tokenizer the model was trained with (--tokenizer)"
        )
    return tok
