"""Recurrent state of an RWKV model as an explicit value."""
from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .errors import one_line
from .fileio import atomic_write

_MAGIC = "rwkv-edge-state"
_VERSION = 1


def _clone(a):
    return a.copy() if isinstance(a, np.ndarray) else a.clone()  # numpy or a device tensor (torch)


def _host(a) -> np.ndarray:
    return a if isinstance(a, np.ndarray) else a.detach().cpu().numpy()


@dataclass
class State:
    """Per-layer recurrent state.

    att_x: (L, D) time-mix token-shift (last normalised input of the time-mix)
    wkv:   (L, H, N, N) float32 wkv matrix per head, indexed [head, value dim, key dim]
    ffn_x: (L, D) channel-mix token-shift
    """
    att_x: np.ndarray
    wkv: np.ndarray
    ffn_x: np.ndarray

    @classmethod
    def zeros(cls, config: ModelConfig) -> "State":
        L, D, H, N = config.n_layer, config.n_embd, config.n_head, config.head_size
        return cls(np.zeros((L, D), np.float32), np.zeros((L, H, N, N), np.float32), np.zeros((L, D), np.float32))

    def copy(self) -> "State":
        return State(_clone(self.att_x), _clone(self.wkv), _clone(self.ffn_x))

    def numpy(self) -> "State":
        """The same state with host numpy arrays (a backend may keep it on a device)."""
        return State(_host(self.att_x), _host(self.wkv), _host(self.ffn_x))

    def matches(self, config: ModelConfig) -> bool:
        L, D, H, N = config.n_layer, config.n_embd, config.n_head, config.head_size
        return (self.att_x.shape == (L, D) and self.ffn_x.shape == (L, D) and self.wkv.shape == (L, H, N, N))

    def save(self, path: str, fingerprint: str = "") -> None:
        """Write atomically to `path` (.npz) with a magic, version and the model fingerprint."""
        with atomic_write(path, prefix=".state-") as f:
            np.savez(f, magic=np.array(_MAGIC), version=np.array(_VERSION), fingerprint=np.array(fingerprint),
                     att_x=_host(self.att_x), wkv=_host(self.wkv), ffn_x=_host(self.ffn_x))

    @classmethod
    def load(cls, path: str, config: ModelConfig | None = None, fingerprint: str = "") -> "State":
        """Read a state written by `save`. Everything is checked before a State is returned: magic,
        version, the model fingerprint (if given), the shapes (with `config`), float dtype, finite
        values. Any problem is a ValueError naming the file (a damaged zip or CRC error included)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            raise ValueError(f"{path}: is a directory, not a state file")
        try:
            with np.load(path, allow_pickle=False) as z:
                if not isinstance(z, np.lib.npyio.NpzFile) or "magic" not in z.files or str(z["magic"]) != _MAGIC:
                    raise ValueError(f"{path}: not an rwkv-edge state file")
                if int(z["version"]) != _VERSION:
                    raise ValueError(f"{path}: state format version {int(z['version'])}, expected {_VERSION}")
                saved_fp = str(z["fingerprint"])
                arrays = {k: z[k] for k in ("att_x", "wkv", "ffn_x")}   # reading checks each member's CRC
        except FileNotFoundError:
            raise ValueError(f"{path}: no such file") from None
        except AttributeError:  # np.load of a plain .npy returns an array
            raise ValueError(f"{path}: not an rwkv-edge state file") from None
        except (OSError, KeyError, EOFError, TypeError, zipfile.BadZipFile, zlib.error) as e:
            raise ValueError(f"{path}: truncated or damaged state file ({one_line(e)})") from None
        except ValueError as e:
            raise ValueError(f"{path}: not a readable rwkv-edge state file ({one_line(e)})") from None
        if fingerprint and saved_fp and saved_fp != fingerprint:
            raise ValueError(f"{path}: state belongs to another model (fingerprint {saved_fp} != {fingerprint})")
        for name, a in arrays.items():
            if a.dtype.kind != "f":
                raise ValueError(f"{path}: state tensor {name} has dtype {a.dtype}, expected float32")
            if not np.isfinite(a).all():
                raise ValueError(f"{path}: state tensor {name} holds NaN or inf values")
        st = cls(*(arrays[k].astype(np.float32) for k in ("att_x", "wkv", "ffn_x")))
        if config is not None and not st.matches(config):
            raise ValueError(f"{path}: state shapes do not match the model ({st.att_x.shape}, {st.wkv.shape}, "
                             f"{st.ffn_x.shape}; the model needs ({config.n_layer}, {config.n_embd}), "
                             f"({config.n_layer}, {config.n_head}, {config.head_size}, {config.head_size}))")
        return st
