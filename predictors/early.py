"""Early FFN-set predictors: score layer L's FFN neurons from a vector known at the START of layer L.

The FFN-input predictor (`quantized.QuantizedPredictor`) scores W_hat xk, where xk only exists after
the time-mix; on a GPU its matvec and the dependent row gather then sit on the critical path. An
early predictor scores a vector available before the time-mix runs, so scoring can overlap it:

    "ln1":   ln1(x_L), the time-mix input                (hook `att_input`, argument xa)
    "resid": x_L, the block input (residual stream)      (hook `att_input`, argument x)

Both are D-vectors, so the predictor keeps the FFN-input predictor's cost and format: an affine
least-squares map e -> xk (xk ~ e A + c, fitted on collected rows) folded into W_k gives
score = (W_k A^T) e + W_k c, i.e. an (F, D) matrix quantized like W_k plus a float32 bias (F,).
Calibration (threshold per layer for a recall target) is the FFN-input predictor's.

    mom = EarlyMoments(model.config, "ln1"); capture(model, tokens, mom.add)     # train rows
    preds = [AffineQuantizedPredictor.fit_early(model, L, mom, bits=2) ...]      # then calibrate
    sparse = masked_model(model, preds, "ln1")                                   # hook-pair sparse run
"""
from __future__ import annotations

import numpy as np

from rwkv_edge.quant import QuantizedMatrix

from .base import LayerPredictor, register
from .quantized import CLIP_CANDIDATES, qm_arrays, qm_describe, qm_from_arrays, quantize_rows, sparsest_clip

INPUTS = ("ffn", "ln1", "resid")      # what an affine predictor scores: the FFN input xk, or an early vector
EARLY_INPUTS = ("ln1", "resid")
BUNDLE_INPUTS = ("ffn", "early")      # what a bundle's predictors score: xk, or [ln1, prev] (EarlyPredictor)


def check_input(name: str) -> str:
    if name not in INPUTS:
        raise ValueError(f"unknown predictor input {name!r}: use one of {', '.join(INPUTS)}")
    return name


class EarlyRows:
    """The one wiring of the early rows: three hooks of the plain model build layer L's rows dict

        att_input  -> {"resid": x_L, "ln1": ln1(x_L)}           (T, D) each, known when layer L starts
        ffn_shift  -> + {"norm": channel-mix input, "prev": its token shift (the FFN shift state)}
        ffn_input  -> + {"ffn": xk}                               (at="ffn" only)

    and hand it to on_rows(layer, rows) at the FFN input (at="ffn") or already at the shift (at="shift",
    when a predictor must decide the set before the FFN runs). Every array goes through `convert`
    (e.g. to float32 host arrays). Used by `capture`, `MaskedFFN`, `EarlySets` and `collect --input early`."""

    def __init__(self, on_rows, convert=None, at: str = "ffn"):
        if at not in ("ffn", "shift"):
            raise ValueError(f"EarlyRows hands rows over at 'ffn' or 'shift', not {at!r}")
        self.on_rows, self.at = on_rows, at
        self.convert = convert or (lambda a: a)
        self.pending = {}

    def on_att(self, layer, x, xa):
        self.pending[layer] = {"resid": self.convert(x), "ln1": self.convert(xa)}

    def on_shift(self, layer, x, prev):
        self.pending[layer].update(norm=self.convert(x), prev=self.convert(prev))
        if self.at == "shift":
            self.on_rows(layer, self.pending.pop(layer))

    def on_ffn(self, layer, xk):
        rows = self.pending.pop(layer)
        rows["ffn"] = self.convert(xk)
        self.on_rows(layer, rows)

    def pairs(self, hooks) -> list:
        """[(hook list, function)] of a model's `hooks`: what attach appends and detach removes."""
        out = [(hooks.att_input, self.on_att), (hooks.ffn_shift, self.on_shift)]
        return out + [(hooks.ffn_input, self.on_ffn)] if self.at == "ffn" else out

    def attach(self, model):
        for where, h in self.pairs(model.hooks):
            where.append(h)
        return model

    def detach(self, model) -> None:
        for where, h in self.pairs(model.hooks):
            where.remove(h)


def capture(model, tokens, on_rows, chunk: int = 512) -> None:
    """Run `tokens` (1-D ids) through `model` in windows of `chunk` (state carried) and call
    on_rows(layer, rows) once per window and layer, rows = {"resid": x (T, D), "ln1": ln1(x) (T, D),
    "norm": the channel-mix input (T, D), "prev": its token shift (T, D), "ffn": xk (T, D)}: the early
    vectors and the FFN input of the same tokens (float32 host arrays; `EarlyRows`)."""
    rows = EarlyRows(on_rows, lambda a: np.asarray(model.ops.to_host(a), np.float32))
    tokens = np.asarray(tokens, np.int64).reshape(-1)
    rows.attach(model)
    try:
        state = None
        for a in range(0, len(tokens), chunk):
            _, state = model.forward(tokens[a:a + chunk].tolist(), state)
    finally:
        rows.detach(model)


class EarlyMoments:
    """Per-layer least-squares accumulators for xk ~ e A + c: G = [e 1]^T [e 1] (D+1, D+1) and
    R = [e 1]^T xk (D+1, D), float64, summed over streamed rows (no activation dump needed)."""

    def __init__(self, config, input_name: str, target: str = "ffn"):
        # target: the rows entry fitted ("ffn" = xk; "y" = xk - mix prev, see add_shift_rows)
        if input_name not in EARLY_INPUTS:
            raise ValueError(f"early input must be one of {', '.join(EARLY_INPUTS)}, not {input_name!r}")
        D, L = config.n_embd, config.n_layer
        self.input, self.target = input_name, target
        self.G = np.zeros((L, D + 1, D + 1))
        self.R = np.zeros((L, D + 1, D))
        self.rows = np.zeros(L, np.int64)

    def add(self, layer: int, rows: dict) -> None:
        e = np.asarray(rows[self.input], np.float64)
        e1 = np.concatenate([e, np.ones((len(e), 1))], 1)                 # (T, D+1)
        self.G[layer] += e1.T @ e1
        self.R[layer] += e1.T @ np.asarray(rows[self.target], np.float64)
        self.rows[layer] += len(e)

    def solve(self, layer: int, ridge: float = 1e-4, rank: int | None = None,
              metric: np.ndarray | None = None, diag: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(A (D, D), c (D,)) minimising |e A + c - xk|^2 + ridge * n * |A|^2 (ridge relative to the
        mean diagonal of G, so it does not depend on the scale of e).

        rank r (None: full): reduced-rank regression, A = (A_ls V) V^T with V (D, r) the top-r right
        singular vectors of the centered least-squares fitted values (e - mean e) A_ls, and c refitted
        free (mean xk - mean e A). Without ridge this is the rank-r A with the least squared error;
        a GPU then applies A as two thin mat-vecs (D x r, r x D: 2 D r weights instead of D^2).
        metric M (D, D) SPD, e.g. W_k^T W_k: the error is measured as |(xk_hat - xk) L|^2, M = L L^T
        (with W_k^T W_k: the error of the scores W_k xk_hat, which is what sets the FFN set).
        diag: A = diag(d) + rank-r, d the per-channel least squares (xk_j on e_j), the rank-r part
        the truncation of A_ls - diag(d) (a GPU adds one element-wise product)."""
        if self.rows[layer] == 0:
            raise ValueError(f"layer {layer}: no rows collected")
        G = self.G[layer].copy()
        D = G.shape[0] - 1
        G[np.arange(D), np.arange(D)] += ridge * np.trace(G[:D, :D]) / D
        sol = np.linalg.solve(G, self.R[layer])                           # (D+1, D)
        A, c = sol[:D], sol[D]
        if rank is None or rank >= D:
            return A, c
        n = float(self.rows[layer])
        mu_e, mu_y = self.G[layer][D, :D] / n, self.R[layer][D] / n       # column means of e and of xk
        d = np.zeros(D)
        if diag:    # per-channel slope: cov(e_j, xk_j) / var(e_j) from the centered moments
            cov = np.diagonal(self.R[layer][:D]) - mu_e * mu_y * n
            var = np.diagonal(self.G[layer][:D, :D]) - mu_e * mu_e * n
            d = cov / np.maximum(var, 1e-30)
            A = A - np.diag(d)
        if rank == 0:       # no low-rank part: A = diag(d) (zero without diag), no basis to compute
            A = np.zeros_like(A)
        elif metric is None:
            V = self.rank_basis(layer, A, rank)                           # (D, r)
            A = (A @ V) @ V.T
        else:       # rank-r fit of the transformed target xk L, mapped back: A L V V^T L^-1
            Lm = np.linalg.cholesky(np.asarray(metric, np.float64))
            V = self.rank_basis(layer, A @ Lm, rank)
            A = np.linalg.solve(Lm.T, ((A @ Lm @ V) @ V.T).T).T
        A = A + np.diag(d)
        return A, mu_y - mu_e @ A

    def rank_basis(self, layer: int, A: np.ndarray, rank: int) -> np.ndarray:
        """V (D, rank): top eigenvectors of the fitted values' scatter A^T S A, S = the centered
        scatter of e (D, D) from the unridged moments (= top right singular vectors of (e - mean e) A)."""
        D, n = A.shape[0], float(self.rows[layer])
        s = self.G[layer][D, :D]
        S = self.G[layer][:D, :D] - np.outer(s, s) / n
        w, U = np.linalg.eigh(A.T @ S @ A)                                # ascending
        return U[:, ::-1][:, :rank]


@register
class AffineQuantizedPredictor(LayerPredictor):
    """score = W_hat e + bias: W_hat (F, D) quantized (`quant.QuantizedMatrix`), bias (F,) float32;
    `input` names the vector e it scores (one of INPUTS; "ffn" with a zero bias is the plain
    W_k predictor). Threshold per layer."""

    kind = "affine-quantized"
    mode = "threshold"

    def __init__(self, qm: QuantizedMatrix, bias: np.ndarray, input_name: str, clip: float | None = None):
        super().__init__()
        self.qm, self.bias, self.input, self.clip = qm, np.asarray(bias, np.float32), check_input(input_name), clip

    @classmethod
    def fit(cls, w: np.ndarray, bias: np.ndarray, input_name: str, bits: int, group_size: int | None = 64,
            clip: float | None = None) -> "AffineQuantizedPredictor":
        return cls(quantize_rows(w, bits, group_size, clip), bias, input_name, clip)

    @classmethod
    def fit_early(cls, w_key: np.ndarray, A: np.ndarray, c: np.ndarray, input_name: str, bits: int,
                  group_size: int | None, x: np.ndarray, act: np.ndarray, target: float, metric: str = "mass",
                  candidates=CLIP_CANDIDATES) -> "AffineQuantizedPredictor":
        """Fold the map xk ~ e A + c into W_k (F, D): W = W_k A^T, bias = W_k c; quantize W with the
        clip (of `candidates`) that is sparsest at `target` recall on early rows x (n, D) whose
        activations are act = relu(W_k xk)^2 (n, F)."""
        w_key = np.asarray(w_key, np.float64)
        w, bias = (w_key @ A.T).astype(np.float32), (w_key @ c).astype(np.float32)
        return sparsest_clip(lambda clip: cls.fit(w, bias, input_name, bits, group_size, clip), x, act, target, metric,
                             candidates)

    def score(self, x: np.ndarray) -> np.ndarray:
        return (self.qm.matvec(np.asarray(x, np.float32)) + self.bias).astype(np.float32, copy=False)

    def score_one(self, x: np.ndarray) -> np.ndarray:
        return (self.qm.matvec(np.asarray(x, np.float32).reshape(-1)) + self.bias).astype(np.float32, copy=False)

    @property
    def bits(self) -> int:
        return self.qm.bits

    @property
    def nbytes(self) -> int:
        return self.qm.nbytes + self.bias.nbytes

    def _arrays(self) -> dict:
        return dict(qm_arrays(self.qm, self.clip), bias=self.bias, input=np.array(self.input))

    @classmethod
    def _from_arrays(cls, get, d, prefix):
        qm, clip = qm_from_arrays(get)
        return cls(qm, get("bias"), str(get("input")), clip)

    def describe(self) -> str:
        return f"affine-quantized {qm_describe(self.qm, self.clip)} on {self.input}"


def early_input(rows: dict) -> np.ndarray:
    """The input an `EarlyPredictor` scores: [ln1(x_L), prev] (T, 2D) from `capture` rows."""
    return np.concatenate([np.asarray(rows["ln1"], np.float32), np.asarray(rows["prev"], np.float32)], 1)


@register
class EarlyPredictor(LayerPredictor):
    """Layer L's FFN set from x = [ln1(x_L), prev] (T, 2D), prev the previous token's channel-mix
    input (the FFN token-shift state): both are known when layer L starts. The FFN input is
    xk = (1 - mix) n + mix prev with n = ln2(x_L + time_mix) the only unknown part, so

        xk_hat = ln1(x_L) A + c + mix prev      A (D, D) float16, c (D,): least squares of xk - mix prev on ln1
        score  = W_hat xk_hat                    W_hat: W_k quantized as for the FFN-input predictor

    and the set is score >= threshold (per layer). The exact shift part matters most in the first
    layers, whose mix is large (median 0.5 at layer 0 of rwkv7-ref-58m); ln1 alone leaves layer 0
    at ~0.9 density for 0.99 recall.
    A diagonal map (fit diag=True, rank=0) is stored as d (D,) float32 instead of A (bundle format
    version 3): xk_hat = ln1 * d + c + mix * prev is element-wise, which a GPU computes in the launch
    that writes ln1 (backends/cuda_decode_early.py). `diag` is True for such a predictor."""

    kind = "early-shift"
    mode = "threshold"

    def __init__(self, A: np.ndarray, c: np.ndarray, mix: np.ndarray, qm: QuantizedMatrix, clip: float | None = None):
        super().__init__()
        A = np.asarray(A)
        self.diag = A.ndim == 1          # A given as its diagonal d (D,)
        # (D, D) stored and read as float16; a diagonal d (D,) as float32 (D numbers, no reason to round)
        self.A = A.astype(np.float32 if self.diag else np.float16)
        self.c, self.mix = np.asarray(c, np.float32), np.asarray(mix, np.float32)
        self.qm, self.clip = qm, clip
        self._a32 = self.A.astype(np.float32)

    @classmethod
    def fit(cls, moments: "EarlyMoments", layer: int, mix: np.ndarray, qm: QuantizedMatrix, clip: float | None = None,
            ridge: float = 1e-4, rank: int | None = None, metric: np.ndarray | None = None,
            diag: bool = False) -> "EarlyPredictor":
        """moments: EarlyMoments(config, "ln1") fed with e = ln1 rows and y = xk - mix * prev rows
        (`add_shift_rows`); qm: the quantized W_k (e.g. a QuantizedPredictor's); rank: of A
        (`EarlyMoments.solve`, with its error metric; None = full; A is stored as the (D, D) product);
        diag with rank 0: A = diag(d), stored as d."""
        A, c = moments.solve(layer, ridge, rank, metric, diag)
        if diag and rank == 0:
            A = np.diagonal(A).copy()
        return cls(A, c, mix, qm, clip)

    @property
    def d(self) -> np.ndarray | None:
        """The diagonal map d (D,) float32, or None for a full A."""
        return self._a32 if self.diag else None

    def xk_hat(self, x: np.ndarray) -> np.ndarray:
        """x (T, 2D) -> the predicted FFN input (T, D)."""
        x = np.asarray(x, np.float32)
        D = self.mix.size
        if x.ndim != 2 or x.shape[1] != 2 * D:
            raise ValueError(f"an early predictor scores [ln1, prev] rows of shape (T, {2 * D}), got {x.shape}")
        lin = x[:, :D] * self._a32 if self.diag else x[:, :D] @ self._a32
        return lin + self.c + self.mix * x[:, D:]

    def score(self, x: np.ndarray) -> np.ndarray:
        return self.qm.matvec(self.xk_hat(x)).astype(np.float32, copy=False)

    @property
    def bits(self) -> int:
        return self.qm.bits

    @property
    def nbytes(self) -> int:
        """W_hat as stored plus A (float16: 2 D^2 bytes, more than a 2-bit W_hat at F = 4 D; diag: 4 D) and c, mix."""
        return self.qm.nbytes + self.A.nbytes + self.c.nbytes + self.mix.nbytes

    def _arrays(self) -> dict:
        return dict(qm_arrays(self.qm, self.clip), c=self.c, mix=self.mix, **{"d" if self.diag else "A": self.A})

    @classmethod
    def _from_arrays(cls, get, d, prefix):
        qm, clip = qm_from_arrays(get)
        try:                    # format version 3: a diagonal map is stored as d (D,)
            A = get("d")
        except ValueError:
            A = get("A")
        return cls(A, get("c"), get("mix"), qm, clip)

    def describe(self) -> str:
        return f"early (ln1{' * d' if self.diag else ''} + shift) {qm_describe(self.qm, self.clip)}"


def add_shift_rows(moments: "EarlyMoments", layer: int, ln1: np.ndarray, prev: np.ndarray, xk: np.ndarray,
                   mix: np.ndarray) -> None:
    """Feed `EarlyPredictor`'s least squares: e = ln1 (T, D), y = xk - mix prev (T, D)."""
    moments.add(layer, {"ln1": ln1, "y": np.asarray(xk, np.float64) - np.asarray(mix, np.float64) * prev})


class EarlySets:
    """An early bundle (input "early") as the predictor of a `sparse.SparseFFN`: the hooks score
    layer L's set from ln1(x_L) (`att_input`) and the FFN shift state (`ffn_shift`; row t is token
    t-1's, known before layer L starts for token t), and `predict` / `predict_indices` hand that set
    to the FFN (its xk argument is not read). `attach(model)` adds the hooks."""

    def __init__(self, bundle):
        if getattr(bundle, "input", "ffn") != "early":
            raise ValueError("EarlySets needs a bundle fitted on early inputs (collect --input early)")
        self.bundle = bundle
        self._mask = {}
        self.rows = None      # the EarlyRows hooks `attach` added (its `pairs` name them)

    def attach(self, model):
        def decide(layer, rows):
            self._mask[layer] = self.bundle.predict(layer, np.concatenate([rows["ln1"], rows["prev"]], 1))
        self.rows = EarlyRows(decide, lambda a: np.asarray(model.ops.to_host(a), np.float32), at="shift")
        return self.rows.attach(model)

    def predict(self, layer: int, xk: np.ndarray) -> np.ndarray:
        return self._mask.pop(layer)

    def predict_indices(self, layer: int, x: np.ndarray) -> np.ndarray:
        return np.flatnonzero(self._mask.pop(layer)[0]).astype(np.int32)


class MaskedFFN:
    """A hook pair running a model sparse with sets predicted from vectors of the SAME run.

    `att_input` keeps {"resid": x, "ln1": ln1(x)}, `ffn_shift` adds {"prev": the previous token's
    channel-mix input} (all known when layer L starts), `ffn_input` adds {"ffn": xk}; there
    predict(layer, rows) -> bool (T, F) gives the set and `ffn_activation` zeroes relu(W_k xk)^2 outside
    it: the math of any sparse FFN given that set (a numpy reference: it saves no work). An early
    predictor must only read the early entries; `input_predict` builds predict from LayerPredictors
    with an `input` name. Counts n_active / n_tokens."""

    def __init__(self, predict, ffn_dim: int):
        self.predict, self.F = predict, int(ffn_dim)
        self.masks = {}
        self.n_tokens = 0
        self.n_active = 0

    def on_rows(self, layer, rows):
        self.masks[layer] = np.asarray(self.predict(layer, rows), bool)

    def on_activation(self, layer, k):
        m = self.masks.pop(layer)
        self.n_tokens += m.shape[0]
        self.n_active += int(m.sum())
        return k * m

    @property
    def density(self) -> float:
        return self.n_active / max(1, self.n_tokens * self.F)

    def attach(self, model):
        """A shallow copy of `model` (weights shared, fresh hooks) that runs with these sets."""
        m = EarlyRows(self.on_rows).attach(model.with_ffn(None))
        m.hooks.ffn_activation.append(self.on_activation)
        return m


def input_predict(predictors, input_name: str | None = None):
    """predict(layer, rows) for `MaskedFFN` from per-layer predictors: each masks rows[its input]
    (its `input` attribute, else `input_name`, e.g. "ffn" for plain W_k predictors)."""
    names = [check_input(getattr(p, "input", None) or input_name) for p in predictors]
    return lambda layer, rows: predictors[layer].mask(rows[names[layer]])
