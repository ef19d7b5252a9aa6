"""Resident FFN memory that follows the active set (LLM-in-a-flash windowing on the mapped model file).

The model file stays mapped; the FFN neuron pages (neuron-bundled: key row + value column of neuron j
are one contiguous record) that no recent token used are given back to the kernel with madvise, so
the process holds the non-FFN weights plus the FFN rows of the last `window` tokens:

    model = load_modelfile("m-int8.rwkve")
    sparse = model.with_ffn(resident_sparse_ffn(model, predictor, window=8, max_resident_mb=120))
    ...; sparse.ffn.residency.stats()  -> resident FFN bytes (policy and measured), hit rate

Bookkeeping is per 4 KiB page: `last[p]` = last token that read page p. Every `period` tokens the
pages outside the hot set (used within `window` tokens, and with a budget: the most recently used
pages that fit in it) are dropped with MADV_DONTNEED (the process's mapping; the page cache keeps a
clean copy unless memory is short) or MADV_PAGEOUT (reclaimed from the page cache as well). A
dropped page read again is one page fault (minor from the page cache, major from disk).
Hit rate: the share of the active neurons whose page was resident by the policy when the token
needed it (the rest are loads: `misses * 4 KiB` bytes). Pages shared with neighbouring tensors
(the first and last page of each layer's bundle) are never dropped.

Prefill runs the same predictor once per token per layer, layer by layer; the token clock advances
on the last layer's calls, so a prefill keeps the union of its tokens' sets until the next eviction.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

import numpy as np

from .memstat import PAGE, resident_bytes
from .sparse import SparseFFN, layer_bundles

ADVICE = {"dontneed": 4, "cold": 20, "pageout": 21, "random": 1, "willneed": 3}
_libc = None


def _madvise(addr: int, length: int, advice: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if _libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), advice) != 0:
        raise OSError(ctypes.get_errno(), f"madvise({advice}): {os.strerror(ctypes.get_errno())}")


def _file_mapped(a) -> bool:
    """Whether ndarray a is a view on an mmap (modelfile.open_tensors' mapping of the model file)."""
    base = a
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return isinstance(base, mmap.mmap) and a.nbytes > 0


def advise_random(arrays) -> None:
    """MADV_RANDOM on file-mapped arrays (or NeuronBundledFFN bundles: their kv) read at scattered
    rows: a sparse FFN's neurons, the embedding's rows. Else each page fault reads read_ahead_kb
    around it (8 MiB on some hosts) and maps the cached neighbours (fault-around). Arrays not backed
    by a file mapping are left alone."""
    for a in arrays:
        a = getattr(a, "kv", a)
        if not _file_mapped(a):
            continue
        lo = a.ctypes.data // PAGE * PAGE
        try:
            _madvise(lo, a.ctypes.data + a.nbytes - lo, ADVICE["random"])
        except OSError:
            pass


def drop_pages(arrays) -> int:
    """MADV_DONTNEED on the whole pages inside file-mapped arrays that nothing reads any more (a copy holds
    their values: the native backend's packed LoRAs): the process's mapping lets them go (the page cache
    keeps a clean copy), so they leave its resident memory; a later read faults them back in from the
    file. The first and last page, which neighbouring tensors may share, are kept; arrays not backed by a
    file mapping are left alone (DONTNEED would zero anonymous memory). The mapping is copy-on-write
    (ACCESS_COPY): a page written in place would go back to the file's bytes, and nothing writes weights.
    Returns the bytes advised."""
    n = 0
    for a in arrays:
        if a is None or not _file_mapped(a):
            continue
        lo = -(-a.ctypes.data // PAGE) * PAGE
        hi = (a.ctypes.data + a.nbytes) // PAGE * PAGE
        if hi > lo:
            try:
                _madvise(lo, hi - lo, ADVICE["dontneed"])
                n += hi - lo
            except OSError:
                pass
    return n


def weight_bytes(model) -> dict:
    """{"ffn": FFN neuron bundle bytes, "embedding": emb bytes, "other": everything else} of a model."""
    ffn = sum(b.kv.nbytes for b in layer_bundles(model))
    seen, other = set(), 0
    stack = [model.head, *model.ln0, *model.ln_out] + [v for b in model.blocks for v in vars(b).values()]
    for v in stack:
        for a in ([v] if isinstance(v, np.ndarray) else [getattr(v, k, None) for k in ("q", "scale", "kv")]):
            if isinstance(a, np.ndarray) and id(a) not in seen:
                seen.add(id(a))
                other += a.nbytes
    return {"ffn": ffn, "embedding": int(np.asarray(model.emb).nbytes), "other": other}


class NeuronResidency:
    """Page bookkeeping and madvise for the FFN bundles of one model (see module docstring)."""

    def __init__(self, bundles, window: int = 8, budget_bytes: int | None = None, period: int = 1,
                 advice: str = "dontneed", prefetch: bool = False):
        if advice not in ADVICE:
            raise ValueError(f"unknown advice {advice!r}, choose one of {', '.join(ADVICE)}")
        self.bundles, self.window, self.period, self.advice = list(bundles), int(window), max(1, int(period)), advice
        self.budget_pages = None if budget_bytes is None else max(0, int(budget_bytes) // PAGE)
        self.prefetch = bool(prefetch)
        self.layers = []
        for b in self.bundles:
            addr, nb = b.kv.ctypes.data, b.kv.nbytes // b.F         # bytes per neuron record
            p0 = addr // PAGE
            n = (addr + b.kv.nbytes - 1) // PAGE + 1 - p0
            j = np.arange(b.F, dtype=np.int64)
            first = ((addr + j * nb) // PAGE - p0).astype(np.int32)  # page of each neuron's first byte
            last = ((addr + j * nb + nb - 1) // PAGE - p0).astype(np.int32)
            self.layers.append(dict(p0=p0, n=n, first=first, last=last, lastuse=np.full(n, -(1 << 30), np.int64),
                                    res=np.ones(n, bool)))
        self.t = 0
        self.hits = self.misses = self.loaded_pages = self.evicted_pages = 0
        self.tokens = 0
        self._drop_all()

    def _drop_all(self) -> None:
        """Start cold: nothing of the FFN resident (the edges shared with other tensors excepted)."""
        for L in self.layers:
            L["res"][:] = False
            L["res"][[0, L["n"] - 1]] = True
            self._drop(L, np.flatnonzero(~L["res"]))

    @staticmethod
    def _advise(L, pages: np.ndarray, advice: int) -> None:
        """One madvise per contiguous run of the sorted page numbers `pages` (relative to the layer)."""
        cut = np.flatnonzero(np.diff(pages) != 1) + 1
        starts, ends = pages[np.r_[0, cut]], pages[np.r_[cut - 1, pages.size - 1]]
        for s, e in zip(starts.tolist(), ends.tolist()):
            _madvise((L["p0"] + s) * PAGE, (e - s + 1) * PAGE, advice)

    def _drop(self, L, pages: np.ndarray, counted: int | None = None) -> None:
        if pages.size == 0:
            return
        self._advise(L, pages, ADVICE[self.advice])
        self.evicted_pages += int(pages.size if counted is None else counted)

    def touch(self, layer: int, idx: np.ndarray) -> None:
        """Token self.t reads the neurons idx of `layer`."""
        L = self.layers[layer]
        f, la = L["first"][idx], L["last"][idx]
        hit = L["res"][f] & L["res"][la]
        nh = int(hit.sum())
        self.hits += nh
        self.misses += idx.size - nh
        pages = np.union1d(f, la)
        new = pages[~L["res"][pages]]
        self.loaded_pages += int(new.size)
        if self.prefetch and new.size:       # start all the reads at once (async) before the kernel faults
            self._advise(L, new, ADVICE["willneed"])
        L["res"][pages] = True
        L["lastuse"][pages] = self.t

    def end_token(self) -> None:
        self.t += 1
        self.tokens += 1
        if self.t % self.period == 0:
            self.evict()

    def evict(self) -> None:
        """Drop every resident page outside the hot set (recent window, within the budget)."""
        hot = [L["lastuse"] > self.t - 1 - self.window for L in self.layers]
        if self.budget_pages is not None and sum(int(h.sum()) for h in hot) > self.budget_pages:
            allu = np.concatenate([np.where(h, L["lastuse"], -(1 << 62)) for h, L in zip(hot, self.layers)])
            keep = np.zeros(allu.size, bool)
            if self.budget_pages:
                keep[np.argpartition(-allu, self.budget_pages - 1)[: self.budget_pages]] = True
            keep &= allu > -(1 << 62)
            hot = np.split(keep, np.cumsum([L["n"] for L in self.layers])[:-1])
        for h, L in zip(hot, self.layers):
            h = h.copy()
            h[[0, L["n"] - 1]] = True
            # every page outside the hot set, also those the kernel mapped around a fault (fault-around)
            self._drop(L, np.flatnonzero(~h), counted=int((L["res"] & ~h).sum()))
            L["res"] &= h

    def resident_policy_bytes(self) -> int:
        return sum(int(L["res"].sum()) for L in self.layers) * PAGE

    def resident_measured_bytes(self) -> int | None:
        """FFN bytes mapped in this process now (/proc/self/pagemap), fault-around pages included."""
        r = [resident_bytes(b.kv) for b in self.bundles]
        return None if None in r else sum(r)

    def stats(self) -> dict:
        n = self.hits + self.misses
        return {"tokens": self.tokens, "window": self.window, "hit_rate": round(self.hits / n, 4) if n else None,
                "loaded_mib_per_token": round(self.loaded_pages * PAGE / 2**20 / max(1, self.tokens), 3),
                "ffn_resident_policy_mib": round(self.resident_policy_bytes() / 2**20, 1),
                "ffn_resident_measured_mib": (lambda m: None if m is None else round(m / 2**20, 1))(
                    self.resident_measured_bytes()),
                "ffn_total_mib": round(sum(b.kv.nbytes for b in self.bundles) / 2**20, 1)}


class _Tracked:
    """A predictor whose sets are reported to a NeuronResidency (the generic, unfused sparse path)."""

    def __init__(self, predict_indices, residency: NeuronResidency):
        self.inner, self.residency = predict_indices, residency

    def predict_indices(self, layer: int, x) -> np.ndarray:
        idx = np.asarray(self.inner(layer, x), np.int32)
        self.residency.touch(layer, idx)
        return idx


class ResidentSparseFFN(SparseFFN):
    """SparseFFN whose FFN pages follow the active set: each token's sets are reported to the
    residency before the FFN reads them, and after the last layer of each token it evicts (so pages
    mapped while computing go too). A quantized-threshold bundle selects with the fused path's
    kernel on its packed codes (no float32 predictor copy), then the sparse FFN runs unfused."""

    def __init__(self, model, predictor, residency: NeuronResidency):
        super().__init__(model, predictor)
        self.select_layers, self.fused = self.fused, None    # block7_step must not take the FFN over
        if self.select_layers is None:      # any other predictor: its sets go through the residency
            self.predict_indices = _Tracked(self.predict_indices, residency).predict_indices
            self.predict_mask = None
        self.residency, self._last = residency, model.config.n_layer - 1

    def __call__(self, layer: int, xk: np.ndarray) -> np.ndarray:
        if self.select_layers is None:
            out = super().__call__(layer, xk)
        else:
            from .backends import numba_cpu as nb
            X = np.ascontiguousarray(xk, np.float32)
            offsets, idx = self._fused_sets(layer, X, self.select_layers)
            for t in range(X.shape[0]):
                self.residency.touch(layer, idx[offsets[t]:offsets[t + 1]])
            self.n_tokens += X.shape[0]
            self.n_active += int(offsets[-1])
            out = nb.sparse_ffn_tokens(X, idx, offsets, self.bundles[layer])
        if layer == self._last:
            self.residency.end_token()
        return out


def min_resident_mb(model) -> float:
    """The smallest --max-resident-mb: every non-FFN weight except the embedding (one row per token)."""
    return weight_bytes(model)["other"] / 2**20


def resident_sparse_ffn(model, predictor, window: int = 8, max_resident_mb: float | None = None, period: int = 1,
                        advice: str = "dontneed", prefetch: bool = False):
    """A ResidentSparseFFN (generic sparse path) over `predictor` (fn(layer, x) -> indices, or an object with
    predict_indices) whose FFN pages follow the active set; `.residency` holds the bookkeeping.
    max_resident_mb: weights budget; the FFN gets what the non-FFN weights leave (ValueError when
    below min_resident_mb); None or inf: no budget, the window alone. prefetch: MADV_WILLNEED on the
    pages a token needs that the policy had dropped, all at once before the kernel reads them (worth
    it when they come from disk: the reads run in parallel instead of one page fault at a time)."""
    budget = None
    if max_resident_mb is not None and max_resident_mb != float("inf"):     # inf: the window alone
        need = min_resident_mb(model)
        if max_resident_mb < need:
            raise ValueError(f"--max-resident-mb {max_resident_mb:g} is below the non-FFN weights: the minimum is "
                             f"{int(np.ceil(need))} MiB")
        budget = int((max_resident_mb - need) * 2**20)
    res = NeuronResidency(layer_bundles(model), window, budget, period, advice, prefetch)
    return ResidentSparseFFN(model, predictor, res)
