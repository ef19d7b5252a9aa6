"""Device time per kernel of one fused decode step (torch.profiler over eager steps), to find where
the step's time goes: python3 tools/gpu_decode_profile.py MODEL.pth [BUNDLE.npz]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from rwkv_edge.backends.cuda_decode import FusedDecode
    from rwkv_edge.predictors.bundle import PredictorBundle
    from rwkv_edge.runtime import open_model

    for mode in ("dense", "exact", "predicted"):
        if mode == "predicted" and len(sys.argv) < 3:
            continue
        m = open_model(sys.argv[1], device="cuda", dtype="fp16")
        b = PredictorBundle.load(sys.argv[2], model=m) if mode == "predicted" else None
        dec = FusedDecode(m, mode, bundle=b, graph=False)
        for t in range(5):
            dec.step(t + 1)
        torch.cuda.synchronize()
        n = 10
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for t in range(n):
                dec.step(t + 7)
            torch.cuda.synchronize()
        tot = {}
        for e in prof.key_averages():
            if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0):
                us = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
                tot[e.key] = (us / n, e.count // n)
        s = sum(v[0] for v in tot.values())
        print(f"== {mode}: device time per step {s:.0f} us (eager; kernels only)")
        for k, (us, c) in sorted(tot.items(), key=lambda kv: -kv[1][0])[:8]:
            print(f"   {k[:40]:40s} {us:8.1f} us/step  x{c}  ({us / max(1, c):.1f} us each)")
        del dec, m
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
