"""Issue 17: the fused CUDA decode on the real rwkv7-ref-58m with a plain (FFN-input) predictor bundle and an
early bundle with a diagonal map (fit-predictors --early-map diag): quality against the GPU's own dense fp16
run, the device-counted densities, the device mask against the numpy EarlyPredictor, and speed, in one process.

    python3 tools/gpu_early_real.py pack --model ../shared/models/rwkv7-ref-58m.pth --text ../shared/data/heldout.txt \\
        --limit 8192 --bundle q2=/work/art/q2.npz --bundle early=BUNDLE --dst DIR1 DIR2 DIR3     # CPU
    python3 tools/gpu_early_real.py run --src DIR1 DIR2 DIR3 --out $OUT                         # GPU machine

pack splits the checkpoint into len(--dst) parts (byte planes of the fp16 tensors, zlib; --emb-used-only: the
embedding rows of tokens outside the windows zeroed, which run never reads) small enough to be carried one
device call each (the last part also takes the bundles and the evaluation windows: the eval
command's --ctx 512 windows of the first --limit tokens, each from a fresh state); run rebuilds the .pth and
scores each window token by token with FusedDecode (graph on): KLD(dense || case), same top-1, perplexity,
then us/token (--rounds runs of --tokens tokens from one state per case and pass, the cases alternating
over --passes passes; the median of a case's runs)."""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_decode_sweep import timed_rounds  # noqa: E402


def pack(args) -> None:
    import torch

    from rwkv_edge.quality import window_segments
    from rwkv_edge.tokenizer import load_tokenizer

    sd = torch.load(args.model, weights_only=True)
    tok = load_tokenizer(args.tokenizer, args.model, sd["emb.weight"].shape[0])
    with open(args.text, encoding="utf-8") as f:
        ids = tok.encode(f.read(args.limit * 16))[:args.limit]
    segs = window_segments(ids, args.ctx)
    if args.emb_used_only:   # run feeds only the windows' input tokens: other rows are never read
        keep = torch.zeros(sd["emb.weight"].shape[0], dtype=torch.bool)
        keep[torch.as_tensor(np.unique([t for s in segs for t in s[0]]))] = True
        sd["emb.weight"] = torch.where(keep[:, None], sd["emb.weight"], torch.zeros_like(sd["emb.weight"]))
        print(f"emb.weight: {int(keep.sum())} of {keep.numel()} rows kept (the others zeroed: they compress away)")
    names = list(sd)
    sizes = np.cumsum([sd[k].numel() for k in names])
    parts = np.minimum(len(args.dst) - 1, (sizes - 1) * len(args.dst) // sizes[-1])
    for j, dst in enumerate(args.dst):
        os.makedirs(dst, exist_ok=True)
        arr = {}
        for k, p in zip(names, parts):
            if p == j:
                u8 = sd[k].contiguous().view(torch.uint8).numpy().reshape(-1, 2)
                arr[k + "|hi"], arr[k + "|lo"] = u8[:, 1].copy(), u8[:, 0].copy()
                arr[k + "|meta"] = np.array(json.dumps([list(sd[k].shape), str(sd[k].dtype)]))
        np.savez_compressed(os.path.join(dst, f"part{j}.npz"), order=np.array(names), **arr)
    np.savez(os.path.join(args.dst[-1], "segments.npz"), inp=np.array([s[0] for s in segs], np.int64),
             tgt=np.array([s[1] for s in segs], np.int64))
    for b in args.bundle:
        name, path = b.split("=", 1)
        with open(path, "rb") as f, open(os.path.join(args.dst[-1], f"bundle_{name}.npz"), "wb") as g:
            g.write(f.read())
    print(f"packed {len(names)} tensors into {len(args.dst)} parts, {len(segs)} windows of {args.ctx}")


def unpack(srcs, path: str) -> None:
    import torch

    sd, order = {}, None
    for f in sorted(p for s in srcs for p in glob.glob(os.path.join(s, "part*.npz"))):
        z = np.load(f)
        order = [str(k) for k in z["order"]]
        for k in z.files:
            if k.endswith("|meta"):
                n = k[:-5]
                shape, dt = json.loads(str(z[k]))
                u8 = np.stack([z[n + "|lo"], z[n + "|hi"]], 1).reshape(-1)
                sd[n] = torch.from_numpy(u8.copy()).view(getattr(torch, dt.split(".")[1])).reshape(shape)
    missing = [k for k in order if k not in sd]
    if missing:
        raise SystemExit(f"parts incomplete: {len(missing)} tensors missing, e.g. {missing[:3]}")
    torch.save({k: sd[k] for k in order}, path)


def run(args) -> None:
    import torch

    from rwkv_edge.backends.cuda_decode import FusedDecode
    from rwkv_edge.predictors.bundle import PredictorBundle
    from rwkv_edge.runtime import open_model

    os.makedirs(args.out, exist_ok=True)
    path = "/tmp/ref58m.pth"
    if not os.path.exists(path):
        unpack(args.src, path)
    data = [s for s in args.src if os.path.exists(os.path.join(s, "segments.npz"))][0]
    seg = np.load(os.path.join(data, "segments.npz"))
    inp, tgt = seg["inp"], seg["tgt"]
    m = open_model(path, device="cuda", dtype="fp16")
    bundles = {os.path.basename(p)[7:-4]: PredictorBundle.load(p)
               for p in sorted(glob.glob(os.path.join(data, "bundle_*.npz")))}
    cases = [("dense", "dense", None, {}), ("exact", "exact", None, {})] + [(n, "predicted", b, {})
                                                                            for n, b in bundles.items()]
    for t in args.tune:       # NAME=JSON: an early bundle's case again with FusedDecode tune overrides
        n, js = t.split("=", 1)
        cases += [(f"{k}+{n}", "predicted", b, json.loads(js)) for k, b in bundles.items() if b.input == "early"]
    W, T = inp.shape
    V = m.config.vocab_size
    base, res, decs, log = None, {}, {}, open(os.path.join(args.out, "real.jsonl"), "w")
    for name, mode, b, tune in cases:
        t0 = time.perf_counter()
        dec = FusedDecode(m, mode, bundle=b, tune=tune)
        lp = torch.empty((W * T, V), dtype=torch.float32, device="cuda")
        steps, rd, ac, bad, tot = 0, 0.0, 0.0, 0, 0
        for w in range(W):
            dec.reset(None)
            for j in range(T):
                early = dec.ez is not None and w == 0 and j < args.mask_check
                prev = dec.st.ffn_x.cpu().numpy() if early else None
                lp[w * T + j] = torch.log_softmax(dec.step(int(inp[w, j])), 0)
                if early:   # the device mask against the numpy predictor on the device's own [ln1, prev]
                    ln1, mk = dec.st.att_x.cpu().numpy(), dec.emask.cpu().numpy()
                    for i, p in enumerate(b.predictors):
                        want = p.mask(np.concatenate([ln1[i], prev[i]])[None].astype(np.float32))[0]
                        bad += int(((mk[i] == 2) != want).sum())    # mask bytes: 1 scored, 2 selected
                        tot += want.size
            s = dec.stats()
            steps += s["steps"]
            rd += s["read_density"] * s["steps"]
            ac += (s["active_density"] or 1.0) * s["steps"]
        tg = torch.from_numpy(tgt.reshape(-1)).cuda()
        nll = -lp.gather(1, tg[:, None]).squeeze(1)
        row = dict(case=name, mode=mode, tokens=int(W * T), ppl=float(torch.exp(nll.mean())),
                   read_density=round(rd / steps, 4), active_density=round(ac / steps, 4),
                   early=dec.early, mixin=dec.mixin, seconds=round(time.perf_counter() - t0, 1))
        if base is None:
            base = lp
        else:
            kl = (base.exp() * (base - lp)).sum(1)
            row.update(kld_mean=float(kl.mean()), kld_se=float(kl.std() / kl.numel() ** 0.5),
                       kld_p99=float(torch.quantile(kl, 0.99)), kld_max=float(kl.max()),
                       same_top1=float((base.argmax(1) == lp.argmax(1)).float().mean()))
            if tot:
                row["mask_mismatch"] = round(bad / tot, 6)
            del lp
        res[name] = row
        decs[name] = dec
    # speed: --tokens held-out tokens from the state after 16, --rounds runs a case and pass, the cases
    # alternating over --passes passes (clock drift spreads over all); the median of all runs of a case
    toks = [int(t) for t in inp.reshape(-1)[16:16 + args.tokens]]
    us = {n: [] for n in decs}
    for ps in range(args.passes):
        for name, dec in decs.items():
            dec.reset(None)
            for t in inp[0, :16]:
                dec.step(int(t))
            us[name] += [1e6 * s for s in timed_rounds(dec, dec.state(), toks, args.rounds)]
    for name, row in res.items():
        row["us_token"] = round(float(np.median(us[name])), 1)
        row["us_runs"] = [round(v, 1) for v in us[name]]
        print(json.dumps(row), flush=True)
        log.write(json.dumps(row) + "\n")
    d = res["dense"]["us_token"]
    print("\n| case | read / active density | KLD | same top-1 | ppl | us/token | x dense |")
    for n, r in res.items():
        print(f"| {n} | {r['read_density']} / {r['active_density']} | {r.get('kld_mean', 0):.6f} | "
              f"{r.get('same_top1', 1):.4f} | {r['ppl']:.3f} | {r['us_token']} | {d / r['us_token']:.3f} |",
              flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer")
    p.add_argument("--text", required=True)
    p.add_argument("--limit", type=int, default=8192)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--bundle", action="append", default=[], help="NAME=PATH")
    p.add_argument("--dst", nargs="+", required=True)
    p.add_argument("--emb-used-only", action="store_true",
                   help="zero the embedding rows of tokens the windows never feed (~12 MB less to carry; "
                        "run's outputs are the same: it feeds only those tokens)")
    r = sub.add_parser("run")
    r.add_argument("--src", nargs="+", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--tokens", type=int, default=256)
    r.add_argument("--rounds", type=int, default=5)
    r.add_argument("--passes", type=int, default=3)
    r.add_argument("--tune", action="append", default=[], help="NAME=JSON: early-bundle cases with tune overrides")
    r.add_argument("--mask-check", type=int, default=128,
                   help="tokens of the first window whose early mask is checked against numpy")
    args = ap.parse_args()
    (pack if args.cmd == "pack" else run)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
