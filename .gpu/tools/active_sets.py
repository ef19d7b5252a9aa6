"""Record the active FFN sets of a trained model on held-out text, for replay on synthetic shapes.

    python tools/active_sets.py [--model ../shared/models/rwkv7-ref-58m.pth] [--text ../shared/data/heldout.txt]
                                [--tokens 1100] --out active-sets.npz

Prints per-layer density and token-to-token overlap. See rwkv_edge/replay.py for the format and the
mapping onto other shapes (tools/bench.py --shape, tools/bench_memcap.py replay it).
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
SHARED = os.path.join(os.path.dirname(HERE), "..", "shared")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(SHARED, "models", "rwkv7-ref-58m.pth"))
    ap.add_argument("--text", default=os.path.join(SHARED, "data", "heldout.txt"))
    ap.add_argument("--tokens", type=int, default=1100)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    for p in (args.model, args.text):
        if not os.path.isfile(p):
            ap.error(f"{p}: no such file")
    if args.tokens < 2:
        ap.error("--tokens must be >= 2")
    from rwkv_edge.replay import record_text
    sets = record_text(args.model, args.text, args.tokens, args.out)
    d, o = sets.density(), sets.overlap()
    print(f"wrote {args.out}: {sets.n_tokens} tokens x {sets.n_layer} layers x {sets.ffn_dim} neurons, "
          f"model {sets.fingerprint}")
    print("density per layer: " + " ".join(f"{x:.3f}" for x in d) + f"  (mean {d.mean():.3f})")
    print("overlap with previous token: " + " ".join(f"{x:.2f}" for x in o) + f"  (mean {o.mean():.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
