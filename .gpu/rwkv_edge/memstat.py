"""Where a process's memory is: RSS and peak RSS, resident bytes of the model-file mapping, and
resident bytes of any array range (Linux /proc; other systems get None).

    rss_mib(), peak_rss_mib()              VmRSS / VmHWM of this process
    mapping_resident(path)                 bytes of `path`'s mappings resident in this process (smaps Rss)
    smaps_by_path(top)                     {mapping name: resident bytes}, largest first
    resident_bytes(array)                  bytes of the pages under `array` present in this process's
                                           page tables (/proc/self/pagemap bit 63)

RSS counts file pages mapped into the process (the mmap'd model), anonymous memory (numpy arrays,
the interpreter, numba's compiled code and LLVM) and shared libraries; the page cache outside the
process is not counted (a cgroup memory limit does count it, see tools/bench_memcap.py).
"""
from __future__ import annotations

import os

import numpy as np

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _status() -> dict:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if v.strip().endswith("kB"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def rss_mib() -> float | None:
    v = _status().get("VmRSS")
    return None if v is None else v / 2**20


def peak_rss_mib() -> float | None:
    """Peak RSS (VmHWM). Not getrusage: on Linux ru_maxrss keeps the parent's peak across fork + exec."""
    v = _status().get("VmHWM")
    return None if v is None else v / 2**20


def status_mib() -> dict:
    """RssAnon / RssFile / RssShmem / VmRSS / VmHWM in MiB."""
    s = _status()
    return {k: round(s[k] / 2**20, 1) for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem") if k in s}


def smaps_by_path(top: int | None = None) -> dict:
    """{mapping path (or [anon], [heap], ...): resident bytes}, largest first."""
    out: dict = {}
    name = None
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 5)
                if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
                    name = head[5].strip() if len(head) > 5 else "[anon]"
                elif line.startswith("Rss:") and name is not None:
                    out[name] = out.get(name, 0) + int(line.split()[1]) * 1024
    except OSError:
        return {}
    items = sorted(out.items(), key=lambda kv: -kv[1])
    return dict(items[:top] if top else items)


def mapping_resident(path) -> int | None:
    """Bytes of the mappings of file `path` resident in this process (0 when not mapped)."""
    real = os.path.realpath(os.fspath(path))
    m = smaps_by_path()
    if not m:
        return None
    return sum(v for k, v in m.items() if k == real or k == real + " (deleted)")


def resident_bytes(a: np.ndarray) -> int | None:
    """Bytes of the pages spanned by array `a` (contiguous) that are mapped in this process now."""
    if a.nbytes == 0:
        return 0
    lo = a.ctypes.data // PAGE
    hi = (a.ctypes.data + a.nbytes - 1) // PAGE + 1
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(lo * 8)
            raw = f.read((hi - lo) * 8)
    except OSError:
        return None
    present = (np.frombuffer(raw, np.uint64) >> np.uint64(63)).astype(bool)
    return int(present.sum()) * PAGE
