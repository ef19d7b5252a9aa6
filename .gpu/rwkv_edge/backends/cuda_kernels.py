"""GPU kernels of the CUDA backend (cuda.py): the Triton wkv scan and half-weight rows product,
compiled on first use, and the torch-loop wkv fallbacks (also the test oracle for the scan).
Importing this module needs torch only; Triton is imported by `kernels()`."""
from __future__ import annotations

import torch

_triton: dict = {}           # "ok": bool, "kernels": the compiled-on-demand jit functions


def kernels():
    """Compile-on-first-use Triton kernels, or None when Triton is unusable (torch loop fallback)."""
    if "ok" in _triton:
        return _triton.get("kernels")
    try:
        import triton
        import triton.language as tl
    except Exception:  # no triton: the torch fallback below
        _triton["ok"] = False
        return None

    @triton.jit
    def wkv_scan(s_in, r_p, w_p, k_p, v_p, a_p, b_p, u_p, y_p, s_out, T,
                 C: tl.constexpr, N: tl.constexpr, BI: tl.constexpr, V7: tl.constexpr, PREFETCH: tl.constexpr,
                 FUSED: tl.constexpr):
        # One program: head h, value rows i in [ib*BI, ib*BI+BI), all N key columns j; the
        # (BI, N) slice of the state lives in registers for the whole sequence.
        # V7:  S = S*w_t[j] + (S @ a_t)_i b_t[j] + v_t[i] k_t[j] ;  y_t[i] = (S @ r_t)_i
        # V6:  y_t[i] = ((S + u[j] v_t[i] k_t[j]) @ r_t)_i ;  S = S*w_t[j] + v_t[i] k_t[j]
        # FUSED (V7): y from the old state, y = S @ (w*r) + sa (b.r) + v (k.r), so both row
        # reductions of a token depend only on the previous state (one reduction on the serial path).
        h = tl.program_id(0)
        ib = tl.program_id(1)
        ii = ib * BI + tl.arange(0, BI)
        jj = tl.arange(0, N)
        soff = h * N * N + ii[:, None] * N + jj[None, :]
        S = tl.load(s_in + soff)
        # per-token pointers, advanced by C each token (64-bit pointer arithmetic: no int32
        # overflow of t * C on long sequences)
        rp, wp, kp = r_p + h * N + jj, w_p + h * N + jj, k_p + h * N + jj
        vp, yp = v_p + h * N + ii, y_p + h * N + ii
        if V7:
            ap, bp = a_p + h * N + jj, b_p + h * N + jj
        else:
            u = tl.load(u_p + h * N + jj)
        r, w, k, v = tl.load(rp), tl.load(wp), tl.load(kp), tl.load(vp)
        if V7:
            a, b = tl.load(ap), tl.load(bp)
        for t in range(T):
            nxt = tl.where(t + 1 < T, C, 0)      # stay on the last token instead of reading past it
            rp, wp, kp, vp = rp + nxt, wp + nxt, kp + nxt, vp + nxt
            if V7:
                ap, bp = ap + nxt, bp + nxt
            if PREFETCH:  # next token's inputs, loaded while this token computes
                rn, wn, kn, vn = tl.load(rp), tl.load(wp), tl.load(kp), tl.load(vp)
                if V7:
                    an, bn = tl.load(ap), tl.load(bp)
            if V7:
                if FUSED:
                    sa = tl.sum(S * a[None, :], axis=1)
                    y = tl.sum(S * (w * r)[None, :], axis=1) + sa * tl.sum(b * r, axis=0) + v * tl.sum(k * r, axis=0)
                    S = S * w[None, :] + sa[:, None] * b[None, :] + v[:, None] * k[None, :]
                else:
                    sa = tl.sum(S * a[None, :], axis=1)
                    S = S * w[None, :] + sa[:, None] * b[None, :] + v[:, None] * k[None, :]
                    y = tl.sum(S * r[None, :], axis=1)
            else:
                kv = v[:, None] * k[None, :]
                y = tl.sum((S + kv * u[None, :]) * r[None, :], axis=1)
                S = S * w[None, :] + kv
            tl.store(yp, y)
            yp += C
            if PREFETCH:
                r, w, k, v = rn, wn, kn, vn
                if V7:
                    a, b = an, bn
            else:
                r, w, k, v = tl.load(rp), tl.load(wp), tl.load(kp), tl.load(vp)
                if V7:
                    a, b = tl.load(ap), tl.load(bp)
        tl.store(s_out + soff, S)

    @triton.jit
    def mm_rows(x_p, w_p, y_p, K, N, sxm, swn, swk, BN: tl.constexpr, BK: tl.constexpr):
        # y[m, n] = sum_k x[m, k] w[n, k]; x float32 (row stride sxm, unit column stride), w half
        # at w_p + n*swn + k*swk (either layout), products and sums in float32. Program: (BN
        # columns, one row m); a (BN, BK) float32 accumulator reduced once at the end.
        pn = tl.program_id(0)
        m = tl.program_id(1)
        nn = pn * BN + tl.arange(0, BN)
        kk = tl.arange(0, BK)
        nmask = nn < N
        acc = tl.zeros((BN, BK), dtype=tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + kk
            kmask = ks < K
            xv = tl.load(x_p + m * sxm + ks, mask=kmask, other=0.0)
            wv = tl.load(w_p + nn[:, None] * swn + ks[None, :] * swk, mask=nmask[:, None] & kmask[None, :], other=0.0)
            acc += wv.to(tl.float32) * xv[None, :]
        tl.store(y_p + m * N + nn, tl.sum(acc, axis=1), mask=nmask)

    _triton.update(ok=True, kernels={"scan": wkv_scan, "rows": mm_rows})
    return _triton["kernels"]


def _wkv7_torch(s, r, w, k, v, a, b):
    """Sequential float32 torch loop (fallback and test oracle); same contract as wkv7."""
    H, N, _ = s.shape
    T = r.shape[0]
    s = s.clone()
    y = torch.empty((T, H * N), device=s.device, dtype=torch.float32)
    r, w, k, v, a, b = (t.reshape(T, H, N) for t in (r, w, k, v, a, b))
    for t in range(T):
        sa = s @ a[t][:, :, None]
        s = s * w[t][:, None, :] + sa * b[t][:, None, :] + v[t][:, :, None] * k[t][:, None, :]
        y[t] = (s @ r[t][:, :, None]).reshape(H * N)
    return y, s


def _wkv6_torch(s, r, w, k, v, u, _unused=None):
    H, N, _ = s.shape
    T = r.shape[0]
    s = s.clone()
    y = torch.empty((T, H * N), device=s.device, dtype=torch.float32)
    r, w, k, v = (t.reshape(T, H, N) for t in (r, w, k, v))
    u = u.reshape(H, N)
    for t in range(T):
        kv = v[t][:, :, None] * k[t][:, None, :]
        y[t] = ((s + kv * u[:, None, :]) @ r[t][:, :, None]).reshape(H * N)
        s = s * w[t][:, None, :] + kv
    return y, s
