"""The product-quantization predictor: W_k's rows encoded with PQ, scored with lookup tables.

Each key row w_f (D,) is split into M sub-vectors of D/M dims, each replaced by the nearest of K
centroids of its subspace (codebooks trained with faiss `IndexPQ`, inner-product metric). For an
input x the approximate inner products are

    table[m, c] = <x_m, codebook[m, c]>          (M, K): D*K multiply-adds
    score[f]    = sum_m table[m, codes[f, m]]    (F,):  F*M lookups

which needs no faiss at inference. The active set is the top-k neurons, k calibrated per layer.
For batches, `score` uses the decoded matrix (sum of the same products, one BLAS call).
"""
from __future__ import annotations

import numpy as np

from .base import LayerPredictor, register


@register
class PQPredictor(LayerPredictor):
    """codes uint8 (F, M), codebooks float16 (M, K, D/M); top-k per token."""

    kind = "pq"
    mode = "topk"

    def __init__(self, codes: np.ndarray, codebooks: np.ndarray):
        super().__init__()
        self.codes = np.ascontiguousarray(codes, np.uint8)             # (F, M)
        self.codebooks = np.ascontiguousarray(codebooks)              # (M, K, dsub)
        M, K, dsub = self.codebooks.shape
        if self.codes.shape[1] != M or int(self.codes.max(initial=0)) >= K:
            raise ValueError(f"PQ codes {self.codes.shape} do not fit codebooks {self.codebooks.shape}")
        self._cb32 = self.codebooks.astype(np.float32)
        self._decoded = None

    @property
    def M(self) -> int:
        return self.codebooks.shape[0]

    @property
    def K(self) -> int:
        return self.codebooks.shape[1]

    @classmethod
    def fit(cls, w_key: np.ndarray, m: int | None = None, nbits: int = 6, seed: int = 0,
            codebook_dtype=np.float16) -> "PQPredictor":
        """Train PQ codebooks on the rows of w_key (F, D) with faiss and encode the rows.

        m: number of sub-vectors (default D/4, i.e. 4 dims each); nbits: log2 centroids per
        subspace (<= 8; 2**nbits must not exceed F)."""
        import faiss

        w = np.ascontiguousarray(w_key, np.float32)
        F, D = w.shape
        m = m or max(1, D // 4)
        if D % m:
            raise ValueError(f"pq: n_embd {D} is not divisible by m={m}")
        if not 1 <= nbits <= 8 or (1 << nbits) > F:
            raise ValueError(f"pq: nbits must be in 1..8 with 2**nbits <= {F} rows, got {nbits}")
        index = faiss.IndexPQ(D, m, nbits, faiss.METRIC_INNER_PRODUCT)
        index.pq.cp.seed = int(seed)
        index.pq.cp.min_points_per_centroid = 1   # F rows per codebook may be few per centroid
        index.pq.verbose = False
        index.train(w)
        K, dsub = 1 << nbits, D // m
        cb = faiss.vector_to_array(index.pq.centroids).reshape(m, K, dsub).astype(codebook_dtype)
        return cls(cls.encode(w, cb.astype(np.float32)), cb)

    @staticmethod
    def encode(w: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
        """Nearest-centroid codes (F, M) uint8 of rows w (F, D) under codebooks (M, K, dsub)."""
        M, K, dsub = codebooks.shape
        ws = np.asarray(w, np.float32).reshape(w.shape[0], M, dsub)       # (F, M, dsub)
        cn = (codebooks ** 2).sum(-1)                                     # (M, K)
        out = np.empty((w.shape[0], M), np.uint8)
        for a in range(0, len(ws), 256):                                  # |w - c|^2 - |w|^2, chunked
            d2 = cn[None] - 2 * np.einsum("fmd,mkd->fmk", ws[a:a + 256], codebooks)   # (f, M, K)
            out[a:a + 256] = d2.argmin(-1)
        return out

    def decoded(self) -> np.ndarray:
        """The approximate W_k (F, D) float32 these codes stand for (cached)."""
        if self._decoded is None:
            F, M = self.codes.shape
            rows = self._cb32[np.arange(M)[None, :], self.codes]          # (F, M, dsub)
            self._decoded = np.ascontiguousarray(rows.reshape(F, -1))
        return self._decoded

    def lookup_tables(self, x: np.ndarray) -> np.ndarray:
        """x (T, D) -> tables (T, M, K) of sub-vector inner products."""
        T = x.shape[0]
        M, K, dsub = self._cb32.shape
        return np.einsum("tmd,mkd->tmk", x.reshape(T, M, dsub), self._cb32, optimize=True)

    def score_lut(self, x: np.ndarray) -> np.ndarray:
        """Scores (T, F) through lookup tables only (the on-device path)."""
        x = np.asarray(x, np.float32)
        tab = self.lookup_tables(x)                                       # (T, M, K)
        F, M = self.codes.shape
        flat = (np.arange(M) * self.K)[None, :] + self.codes              # (F, M) into M*K
        return tab.reshape(x.shape[0], M * self.K)[:, flat].sum(-1, dtype=np.float32)   # (T, F)

    def score_one(self, x: np.ndarray) -> np.ndarray:
        return self.score_lut(np.asarray(x, np.float32).reshape(1, -1))[0]

    def score(self, x: np.ndarray) -> np.ndarray:
        # Same sums as score_lut, in one matmul: <x, decoded_f> = sum_m <x_m, codebook[m, codes[f, m]]>.
        return np.asarray(x, np.float32) @ self.decoded().T

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.codebooks.nbytes)           # as stored: one byte per code

    def _arrays(self) -> dict:
        return {"codes": self.codes, "codebooks": self.codebooks}

    @classmethod
    def _from_arrays(cls, get, d, prefix):
        return cls(get("codes"), get("codebooks"))

    def describe(self) -> str:
        return f"pq m={self.M} k={self.K}"
