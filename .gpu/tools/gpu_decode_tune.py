"""Launch-shape search for the fused decode (cuda_decode.TUNE) on one model, in one process:
coordinate descent over the knobs, each setting scored by the geometric mean of the captured
decode tok/s of the dense, exact and predicted modes (median of 3 runs of 128 tokens).

    python3 tools/gpu_decode_tune.py MODEL.pth BUNDLE.npz [KNOB=v1,v2 ...]
KNOB=values (JSON values, e.g. head_warps=8,16 pdl=false) replaces the default knob list.
Prints one line per evaluated setting and the best setting last."""
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KNOBS = [("head_warps", [8, 16, 4]), ("gemv_bn", [4, 8, 2]), ("key_bn", [8, 16, 4]), ("value_bn", [2, 4, 1]),
         ("key_warps", [8, 4]), ("value_bs", [64, 32, 128]), ("value_bd", [256, 128, 512]),
         ("value_per_sm", [2, 4, 1]), ("gemv_warps", [4, 8]), ("pdl", [True, False])]


def main() -> int:
    import numpy as np
    import torch

    from rwkv_edge.backends import cuda_decode as CD
    from rwkv_edge.predictors.bundle import PredictorBundle
    from rwkv_edge.runtime import open_model

    knobs = KNOBS
    if len(sys.argv) > 3:
        knobs = [(a.split("=")[0], [json.loads(v) for v in a.split("=")[1].split(",")]) for a in sys.argv[3:]]
    m = open_model(sys.argv[1], device="cuda", dtype="fp16")
    bundle = PredictorBundle.load(sys.argv[2], model=m)
    _, st = m.forward([1, 2, 3])

    def rate(mode, tune):
        dec = CD.FusedDecode(m, mode, bundle=bundle if mode == "predicted" else None, tune=tune)
        rs = []
        for _ in range(4):
            dec.reset(st)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for tok in range(128):
                dec.step(tok + 1)
            torch.cuda.synchronize()
            rs.append(128 / (time.perf_counter() - t))
        del dec
        return float(np.median(rs[1:]))

    def score(tune):
        r = {md: rate(md, tune) for md in ("dense", "exact", "predicted")}
        g = math.exp(sum(math.log(v) for v in r.values()) / 3)
        print(f"{tune} -> " + " ".join(f"{k}={v:.1f}" for k, v in r.items()) + f" geo={g:.1f}", flush=True)
        return g

    best = dict(CD.TUNE)
    best_s = score(best)
    for k, vals in knobs:
        for v in vals:
            if v == best[k]:
                continue
            t = dict(best, **{k: v})
            try:
                s = score(t)
            except Exception as e:  # a shape this kernel cannot take
                print(f"{t} -> failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            if s > best_s * 1.01:
                best, best_s = t, s
    print(f"BEST {best} geo={best_s:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
