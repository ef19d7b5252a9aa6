"""Where the fused decode step's time goes, per kind of kernel (torch.profiler):

    python3 tools/gpu_decode_profile.py MODEL.pth [BUNDLE.npz] [--graph] [--set NAME=JSON ...]

Eager (default): device time of each kernel launched alone (graph off: the host's launch gaps
separate the kernels, so each one's time is its isolated latency, weight loads included).
--graph: the captured step replayed (PDL on, kernels overlap): each kernel is charged the time by
which it moved the step's end, end(k) - max(end of the kernels before it), so the charges add up to
the step and a kernel whose loads overlap its predecessor costs only its exposed tail. Kernels are
labelled by their place in a layer: ln1 mix, att gemv (r/k/v + LoRA), att_head, att_o gemv, ln2
mix, ffn_key (dense: keys; sparse: [predictor scores,] keys and value rows), ffn value gemv (dense),
then the output LN mix and the head gemv. --set NAME=JSON: cuda_decode.TUNE overrides (a "modes"
list inside picks the modes; default dense, exact[, predicted with a bundle]), e.g. diag variants.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _labels(names, L):
    """Kernel names of one step in launch order -> labels by their place in the layer."""
    out, prev = [], None
    for j, n in enumerate(names):
        last2 = j >= len(names) - 2
        if n.startswith("mix"):
            lab = "out_mix" if last2 else ("ln2_mix" if prev == "att_o" else "ln1_mix")
        elif n.startswith("gemv"):
            lab = ("head" if prev == "out_mix" else "att_o" if prev == "att_head" else
                   "ffn_value" if prev == "ffn_key" else "att_gemv")
        else:
            lab = n.split("_0")[0] if "_0" in n else n
        out.append(lab)
        prev = lab
    return out


def profile(dec, n, graph):
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile as tprof

    for t in range(5):
        dec.step(t + 1)
    torch.cuda.synchronize()
    with tprof(activities=[ProfilerActivity.CUDA]) as prof:
        for t in range(n):
            dec.step(t + 7)
        torch.cuda.synchronize()
    ours = ("mix", "gemv", "att_head", "ffn_")      # the step's Triton kernels (not the token's fill)
    ev = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA and e.name.startswith(ours)),
                key=lambda e: e.time_range.start)
    per = len(ev) // n
    if per == 0:
        return None
    lab = _labels([e.name for e in ev[:per]], dec.L)
    charge, iso, step = {}, {}, []
    for r in range(n):
        es = ev[r * per:(r + 1) * per]
        hi = es[0].time_range.start
        for k, e in enumerate(es):
            c = max(0.0, e.time_range.end - hi) if graph else e.time_range.end - e.time_range.start
            hi = max(hi, e.time_range.end)
            charge[lab[k]] = charge.get(lab[k], 0.0) + c / n
            iso[lab[k]] = iso.get(lab[k], 0.0) + (e.time_range.end - e.time_range.start) / n
        step.append(hi - es[0].time_range.start)
    return dict(per_step=per, step_us=sorted(step)[len(step) // 2], charge=charge, dur=iso)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("bundle", nargs="?")
    ap.add_argument("--graph", action="store_true")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    import torch

    from rwkv_edge.backends.cuda_decode import FusedDecode
    from rwkv_edge.predictors.bundle import PredictorBundle
    from rwkv_edge.runtime import open_model

    sets = [(s.split("=", 1)[0], json.loads(s.split("=", 1)[1])) for s in args.set] or [("default", {})]
    m = open_model(args.model, device="cuda", dtype="fp16")
    b = PredictorBundle.load(args.bundle, model=m) if args.bundle else None
    for name, tune in sets:
        tune = dict(tune)
        modes = tune.pop("modes", ["dense", "exact"] + (["predicted"] if b else []))
        for mode in modes:
            dec = FusedDecode(m, mode, bundle=b if mode == "predicted" else None, graph=args.graph, tune=tune)
            r = profile(dec, args.steps, args.graph)
            if r is None:
                print(f"== {name} {mode}: no kernel events recorded")
                continue
            kind = "charged end-to-end (graph)" if args.graph else "isolated (eager)"
            print(f"== {name} {mode}: {r['per_step']} kernels, step {r['step_us']:.0f} us; us per token, {kind} "
                  f"[sum of kernel durations]")
            for k, us in sorted(r["charge"].items(), key=lambda kv: -kv[1]):
                print(f"   {k:12s} {us:8.1f}  [{r['dur'][k]:8.1f}]")
            print(json.dumps(dict(set=name, mode=mode, **r)), flush=True)
            del dec
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
