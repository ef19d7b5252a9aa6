"""One exit-code convention for the CLI and every tool: bad input is one line and exit code 2.

    rwkv-edge: error: m.pth: truncated or corrupt checkpoint (...)      -> exit 2
    rwkv-edge: interrupted                                              -> exit 130 (Ctrl-C)
    rwkv-edge: terminated                                               -> exit 143 (SIGTERM)

`run_main(prog, fn)` runs a command's body under that convention: the errors that bad input
raises (files that are missing, damaged, of another model, not UTF-8, ...) become one line on
stderr; SIGTERM unwinds like Ctrl-C, so `finally` blocks and `atomic_write` remove their temp
files. Programming errors (TypeError, AttributeError, ...) keep their traceback.
Library code raises; only the entry points (cli.main, tools/*.py) call `run_main`.
"""
from __future__ import annotations

import argparse
import signal
import sys
import zipfile
import zlib

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class UserError(ValueError):
    """Bad input found while running (the message names the file or option and what is wrong)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `prog: error: message`, exit 2 (no usage block);
    subparsers made from it are of this class too."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM, so cleanup code runs as for Ctrl-C."""


# what damaged or unexpected input raises from numpy, zipfile, json, torch, onnx, tokenizers
BAD_INPUT = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, UnicodeError)


def one_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type when it has none), at most `limit` chars."""
    text = str(e).strip()
    if isinstance(e, OSError) and e.strerror and e.filename:
        text = f"{e.filename}: {e.strerror}"
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def error_exit(prog: str, msg, code: int = EXIT_BAD_INPUT) -> int:
    """Print `prog: error: msg` (one line) on stderr and return `code` (for `return error_exit(...)`)."""
    text = one_line(msg) if isinstance(msg, BaseException) else str(msg).strip().splitlines()[0]
    print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
    return code


def _on_sigterm(signum, frame):
    raise Terminated(EXIT_TERMINATED)


def run_main(prog: str, fn, *args, extra_errors: tuple = ()) -> int:
    """`fn(*args)` -> exit code, with bad input -> one line + 2, Ctrl-C -> 130, SIGTERM -> 143.

    extra_errors: further exception types a caller knows to mean bad input (e.g. onnxruntime's).
    """
    try:
        old = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:          # not the main thread: leave signals alone
        old = None
    try:
        return int(fn(*args) or 0)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"{prog}: terminated", file=sys.stderr, flush=True)
        return EXIT_TERMINATED
    except BrokenPipeError:     # `| head` closed stdout: not an error; keep the exit flush quiet
        try:
            import os
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 0
    except BAD_INPUT + tuple(extra_errors) as e:
        return error_exit(prog, e)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def read_text_file(path: str, what: str = "--text", limit: int | None = None) -> str:
    """The text of a UTF-8 file; UserError (one line) when it is missing or not UTF-8 text.
    limit: read at most this many characters."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read() if limit is None else f.read(limit)
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path}: not a UTF-8 text file (invalid byte {e.object[e.start:e.start + 1]!r} "
                        f"near byte {e.start})") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path}: is a directory, expected a text file") from None
    except FileNotFoundError:
        raise UserError(f"{what} {path}: no such file") from None


def check_text_file(path: str, what: str = "--text", probe: int = 1 << 20) -> None:
    """UserError unless the first `probe` bytes of `path` are UTF-8 text (a binary file given as
    text would otherwise be tokenized into garbage without a word)."""
    import codecs

    with open(path, "rb") as f:
        head = f.read(probe)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)   # a cut last character is fine
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path}: not a UTF-8 text file (invalid byte {e.object[e.start:e.start + 1]!r} "
                        f"near byte {e.start})") from None


def clean_text(text: str, what: str, note=None) -> str:
    """`text` with bytes that were not valid UTF-8 (surrogate escapes from argv or stdin) replaced by
    U+FFFD; `note(message)` is called once when something was replaced."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # lone surrogates that no byte stands for
        raw = text.encode("utf-8", "replace")
    fixed = raw.decode("utf-8", "replace")
    if note is not None:
        bad = sum(1 for c in text if "\udc80" <= c <= "\udcff")
        note(f"note: {what} is not valid UTF-8; {bad} invalid byte(s) replaced by U+FFFD")
    return fixed
