"""Golden logits of the embedded tiny model from the reference `rwkv` pip package (like rwkv.cpp's
expected-logits files), for tests/test_embedded.py: CI then checks a real trained model against the
reference implementation without running the package.

    python tools/make_golden.py [--model ../shared/models/rwkv7-tiny-9m.pth] [--out tests/data/tiny_golden.npz]

Writes (atomically) prompt ids, the logits after the prompt (its sequence path), the logits of a few
single-token steps after it, and the source model's fingerprint. The package runs in a subprocess
(RWKV_V7_ON is read at its import), strategy 'cpu fp32'.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from rwkv_edge.fileio import atomic_write  # noqa: E402

DEFAULT_MODEL = os.path.join(HERE, "..", "..", "shared", "models", "rwkv7-tiny-9m.pth")
PROMPT_TEXT = "It was a bright cold day in April, and the clocks were striking thirteen. Winston"
STEPS = [11, 310, 2024, 7]

_SCRIPT = """
import sys, numpy as np
from rwkv.model import RWKV
path, out = sys.argv[1], sys.argv[2]
prompt = [int(t) for t in sys.argv[3].split(",")]
steps = [int(t) for t in sys.argv[4].split(",")]
model = RWKV(model=path[:-len(".pth")], strategy="cpu fp32")
logits, state = model.forward(prompt, None)
outs = []
for t in steps:
    o, state = model.forward([t], state)
    outs.append(o.float().numpy())
np.savez(out, prompt=logits.float().numpy(), steps=np.stack(outs))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="make_golden.py", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out", default=os.path.join(HERE, "..", "tests", "data", "tiny_golden.npz"))
    args = ap.parse_args(argv)
    import rwkv_edge
    from rwkv_edge.tokenizer import load_tokenizer

    model = rwkv_edge.load_model(args.model, backend="reference")
    tok = load_tokenizer(None, args.model, model.config.vocab_size)
    prompt = [0] + tok.encode(PROMPT_TEXT)
    with tempfile.TemporaryDirectory() as d:
        res = os.path.join(d, "res.npz")
        env = dict(os.environ, RWKV_V7_ON="1", RWKV_JIT_ON="1", RWKV_CUDA_ON="0")
        r = subprocess.run([sys.executable, "-c", _SCRIPT, os.path.abspath(args.model), res,
                            ",".join(map(str, prompt)), ",".join(map(str, STEPS))], env=env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(f"make_golden.py: error: the rwkv package failed: {r.stderr.strip().splitlines()[-1]}", file=sys.stderr)
            return 2
        z = np.load(res)
        with atomic_write(args.out) as f:
            np.savez_compressed(f, prompt_ids=np.array(prompt, np.int32), step_ids=np.array(STEPS, np.int32),
                                prompt=z["prompt"].astype(np.float32), steps=z["steps"].astype(np.float32),
                                fingerprint=np.array(model.fingerprint))
    print(f"wrote {args.out}: {len(prompt)} prompt tokens, {len(STEPS)} steps, fingerprint {model.fingerprint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
