"""Writing files atomically: a temp file in the target's directory, fsync, then rename.

A crash or an error mid-write never leaves a half-written file under the final name, and the
temp file is removed on failure. Temp names carry the writer's process id
(`.rwkve-<pid>-XXXX.tmp`): a process killed with SIGKILL cannot clean up, so the next write into
the same directory removes temps whose process no longer runs (`clean_stale_temps`).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True        # exists (another user's) or unknown: keep its files
    return True


def temp_prefix(prefix: str) -> str:
    """`prefix` + this process's id: the start of the name of a temp file or directory we create."""
    return f"{prefix}{os.getpid()}-"


def clean_stale_temps(directory, prefix: str, suffix: str = ".tmp") -> list:
    """Remove `<prefix><pid>-*<suffix>` files/directories in `directory` left by processes that no
    longer run (killed mid-write). Returns the removed paths."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        pid = name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        p = os.path.join(directory, name)
        try:
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
            removed.append(p)
        except OSError:
            pass
    return removed


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", prefix: str = ".tmp-"):
    """`with atomic_write(p) as f: ...` writes `p` all at once; mode "wb" or "w"."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    clean_stale_temps(d, prefix)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=temp_prefix(prefix), suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())      # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_versioned_npz(path, magic: str, version, what: str, unreadable: str | None = None) -> dict:
    """{name: array} of a .npz that the tools write with a `magic` and `format_version` entry (no
    pickles). ValueError naming `what` (e.g. "predictor bundle") when the file is missing, cannot be
    read (`unreadable`: the message for that case, default "not a {what}"), is not this kind of file
    or has another format version (`version`: an int, or a tuple of the versions this code reads)."""
    import zipfile

    import numpy as np

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such {what}")
    unreadable = unreadable or f"not a {what}"
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: {unreadable} ({type(e).__name__})") from None
    try:
        with z:
            if not isinstance(z, np.lib.npyio.NpzFile) or "magic" not in z.files or str(z["magic"]) != magic:
                raise ValueError(f"{path}: not an rwkv-edge {what}")
            ver = int(z["format_version"])
            known = version if isinstance(version, tuple) else (version,)
            if ver not in known:
                raise ValueError(f"{path}: {what} format version {ver}, this code reads "
                                 f"{' and '.join(map(str, known))}")
            return {k: z[k] for k in z.files}
    except (OSError, EOFError, KeyError, TypeError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: {unreadable} ({type(e).__name__})") from None
