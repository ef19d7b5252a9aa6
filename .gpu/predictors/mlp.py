"""The MLP predictor: D -> hidden (ReLU) -> F logits, one per FFN neuron (Deja Vu style).

Trained with torch (CPU by default) on collected FFN inputs, labels recomputed from W_k, with
class-weighted BCE (pos_weight = negatives / positives of the layer, so the rare active class
counts as much as the inactive one). Inputs are standardized during training and the
standardization is folded into the first layer afterwards, so inference is two numpy matmuls
on float16-stored weights. torch is imported only by `fit`.
"""
from __future__ import annotations

import numpy as np

from .base import LayerPredictor, register


@register
class MLPPredictor(LayerPredictor):
    """score(x) = relu(x @ w1 + b1) @ w2 + b2 (logits); threshold per layer."""

    kind = "mlp"
    mode = "threshold"

    def __init__(self, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray):
        super().__init__()
        self.w1, self.b1 = w1, b1          # (D, h) float16, (h,) float32
        self.w2, self.b2 = w2, b2          # (h, F) float16, (F,) float32
        self._f32 = None                   # float32 copies for numpy matmuls

    def _weights(self):
        if self._f32 is None:
            self._f32 = (self.w1.astype(np.float32), self.b1.astype(np.float32),
                         self.w2.astype(np.float32), self.b2.astype(np.float32))
        return self._f32

    def score(self, x: np.ndarray) -> np.ndarray:
        w1, b1, w2, b2 = self._weights()
        h = np.maximum(np.asarray(x, np.float32) @ w1 + b1, 0.0)        # (T, h)
        return h @ w2 + b2                                              # (T, F)

    @property
    def hidden(self) -> int:
        return self.w1.shape[1]

    @property
    def nbytes(self) -> int:
        return int(self.w1.nbytes + self.b1.nbytes + self.w2.nbytes + self.b2.nbytes)

    def _arrays(self) -> dict:
        return {"w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2}

    @classmethod
    def _from_arrays(cls, get, d, prefix):
        return cls(get("w1"), get("b1"), get("w2"), get("b2"))

    def describe(self) -> str:
        return f"mlp hidden={self.hidden}"

    @classmethod
    def fit(cls, x: np.ndarray, w_key: np.ndarray, hidden: int = 64, epochs: int = 4, batch_size: int = 512,
            lr: float = 2e-3, seed: int = 0, device: str = "cpu", weight_dtype=np.float16,
            progress: bool = False, desc: str = "mlp", threads: int | None = None) -> "MLPPredictor":
        """Train on FFN inputs x (n, D) float32 of one layer whose key matrix is w_key (F, D).

        Labels: (x @ w_key.T > 0). Loss: BCE with pos_weight = negatives/positives over x.
        Adam with a linearly decaying learning rate; deterministic for a given seed and device.
        threads: torch CPU threads while training (None: torch's default). On a busy small machine
        1 thread is often faster than spinning several.
        """
        import torch

        old_threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(int(threads))
        try:
            return cls._fit(torch, x, w_key, hidden, epochs, batch_size, lr, seed, device, weight_dtype, progress, desc)
        finally:
            torch.set_num_threads(old_threads)

    @classmethod
    def _fit(cls, torch, x, w_key, hidden, epochs, batch_size, lr, seed, device, weight_dtype, progress, desc):

        if hidden <= 0 or epochs <= 0 or batch_size <= 0:
            raise ValueError("hidden, epochs and batch_size must be positive")
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda asked for but torch sees no CUDA device")
        x = np.asarray(x, np.float32)
        n, D = x.shape
        F = w_key.shape[0]
        mu = x.mean(0)
        sd = x.std(0)
        sd = np.maximum(sd, 1e-2 * float(sd.mean()) + 1e-8)            # no blow-up on dead dims

        g = torch.Generator().manual_seed(int(seed))
        torch.manual_seed(int(seed))
        xs = torch.from_numpy((x - mu) / sd).to(dev)                    # (n, D) standardized
        wk = torch.from_numpy(np.asarray(w_key, np.float32)).to(dev)    # (F, D)
        xt = torch.from_numpy(x).to(dev)
        y = torch.empty((n, F), dtype=torch.bool, device=dev)           # labels, 1 byte per cell
        for a in range(0, n, 8192):
            y[a:a + 8192] = (xt[a:a + 8192] @ wk.T) > 0
        del xt
        pos = float(y.sum())
        neg = float(n * F) - pos
        pos_weight = torch.tensor(neg / max(pos, 1.0), device=dev)

        net = torch.nn.Sequential(torch.nn.Linear(D, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, F)).to(dev)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        steps = epochs * (-(-n // batch_size))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - 0.9 * s / max(1, steps))
        loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=steps, desc=desc, unit="step", leave=False, dynamic_ncols=True)
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g).to(dev)
            for a in range(0, n, batch_size):
                idx = perm[a:a + batch_size]
                loss = loss_fn(net(xs[idx]), y[idx].float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()

        # Fold the standardization into layer 1: (x - mu)/sd @ W1.T + b = x @ (W1/sd).T + (b - W1 @ (mu/sd)).
        w1 = net[0].weight.detach().cpu().numpy().astype(np.float64)    # (h, D)
        b1 = net[0].bias.detach().cpu().numpy().astype(np.float64)
        w1f = (w1 / sd).T.astype(weight_dtype)                          # (D, h)
        b1f = b1 - mu.astype(np.float64) @ w1f.astype(np.float64)       # uses the rounded w1f
        w2 = net[2].weight.detach().cpu().numpy().T                     # (h, F)
        b2 = net[2].bias.detach().cpu().numpy()
        return cls(w1f, b1f.astype(np.float32), w2.astype(weight_dtype), b2.astype(np.float32))
