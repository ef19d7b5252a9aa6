"""Model packages: one directory holding everything a sparse model needs, self-describing.

    DIR/model.json        manifest (below)
    DIR/model.rwkve       the project's mmap-able model file (rwkv-edge convert)
    DIR/predictors.npz    predictor bundle (optional: a package may be dense only)
    DIR/tokenizer.json    the tokenizer

model.json (UTF-8 JSON):
    format "rwkv-edge-package", format_version (int; a newer one than FORMAT_VERSION is refused),
    fingerprint (the source checkpoint's, also in the model file's header and the bundle),
    source (file name the package was made from), config (ModelConfig.to_dict()), dtype (of the model
    file), files {model, predictors (or null), tokenizer}, tokenizer_sha256, model_sha256 and
    predictors_sha256 (of the part files; predictors are checked at open, the model file by its header),
    predictor (kind and
    threshold settings, free-form), measured (density, bytes/token, KLD, ..., free-form), created
    (ISO date), tool (the rwkv-edge version that wrote it).

Opening a package checks that the parts belong together (model file fingerprint and config, bundle
fingerprint, tokenizer hash) and names the part that does not. `write_package` builds the directory
beside its final place and renames it into place, so it appears complete or not at all.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile

from .config import ModelLoadError

FORMAT = "rwkv-edge-package"
FORMAT_VERSION = 1
MANIFEST = "model.json"
MODEL_FILE, PREDICTORS_FILE, TOKENIZER_FILE = "model.rwkve", "predictors.npz", "tokenizer.json"


def is_package(path) -> bool:
    """True for a directory with a model.json: a package (or something claiming to be one)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST))


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path) -> dict:
    """The validated model.json of package `path` (ModelLoadError with one line otherwise)."""
    mpath = os.path.join(path, MANIFEST)
    try:
        with open(mpath, encoding="utf-8") as f:
            man = json.load(f)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read {MANIFEST} ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError):
        raise ModelLoadError(f"{mpath}: not valid JSON") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise ModelLoadError(f"{mpath}: not an rwkv-edge package manifest")
    version = man.get("format_version")
    if not isinstance(version, int):
        raise ModelLoadError(f"{mpath}: no format_version")
    if version > FORMAT_VERSION:
        raise ModelLoadError(f"{mpath}: package format version {version} is newer than this runtime reads "
                             f"({FORMAT_VERSION}); upgrade rwkv-edge")
    files = man.get("files")
    if not isinstance(files, dict) or not isinstance(files.get("model"), str):
        raise ModelLoadError(f"{mpath}: no 'files.model' entry")
    for key in ("model", "predictors", "tokenizer"):
        name = files.get(key)
        if name is None and key != "model":
            continue
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            raise ModelLoadError(f"{mpath}: files.{key} must be a file name inside the package")
        if not os.path.isfile(os.path.join(path, name)):
            raise ModelLoadError(f"{path}: package part missing: {name} ({key})")
    if not isinstance(man.get("fingerprint"), str):
        raise ModelLoadError(f"{mpath}: no fingerprint")
    return man


def part(path, man: dict, key: str) -> str | None:
    """Absolute path of part `key` ("model", "predictors", "tokenizer") of a package, or None."""
    name = man["files"].get(key)
    return None if name is None else os.path.join(os.path.abspath(path), name)


def check_parts(path, man: dict) -> None:
    """ModelLoadError naming the part that does not belong to this package's model."""
    from .modelfile import read_header

    model_file = part(path, man, "model")
    header = read_header(model_file)
    if header["fingerprint"] != man["fingerprint"] or header["config"] != man.get("config", header["config"]):
        raise ModelLoadError(f"{path}: {man['files']['model']} belongs to another model "
                             f"(fingerprint {header['fingerprint']}, package {man['fingerprint']})")
    if header["dtype"] != man.get("dtype", header["dtype"]):
        raise ModelLoadError(f"{path}: {man['files']['model']} is a {header['dtype']} model file, the package's is "
                             f"{man['dtype']}")
    preds = part(path, man, "predictors")
    if preds is not None and man.get("predictors_sha256") and sha256_file(preds) != man["predictors_sha256"]:
        raise ModelLoadError(f"{path}: {man['files']['predictors']} is not the predictor bundle this package was made with")
    tok = part(path, man, "tokenizer")
    if tok is not None and man.get("tokenizer_sha256") and sha256_file(tok) != man["tokenizer_sha256"]:
        raise ModelLoadError(f"{path}: {man['files']['tokenizer']} is not the tokenizer this package was made with")
    # the bundle's fingerprint is checked against the model when it is loaded (PredictorBundle.load)


def open_package(path, backend: str = "auto", dense: bool = False, device: str = "cpu", dtype: str = "fp32"):
    """(model, manifest) of package `path`: the model file opened on `backend`, sparse with the
    package's predictors unless `dense` (or the package has none)."""
    from .runtime import open_model

    return open_model(path, backend=backend, dense=dense, device=device, dtype=dtype), read_manifest(path)


def write_package(out, model_file: str, tokenizer_file: str, predictors_file: str | None = None,
                  info: dict | None = None, move: bool = False) -> dict:
    """Assemble a package at `out` (which must not exist or be an empty directory) from its parts;
    `info` adds manifest entries (source, predictor, measured, ...). move=True moves the parts
    instead of copying them. Returns the manifest. The directory appears complete or not at all."""
    from . import __version__
    from .modelfile import read_header

    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ModelLoadError(f"{out}: already exists; choose a new output directory")
    header = read_header(model_file)
    man = {"format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": header["fingerprint"],
           "config": header["config"], "dtype": header["dtype"],
           "files": {"model": MODEL_FILE, "predictors": PREDICTORS_FILE if predictors_file else None,
                     "tokenizer": TOKENIZER_FILE},
           "tokenizer_sha256": sha256_file(tokenizer_file), "model_sha256": sha256_file(model_file),
           "predictors_sha256": sha256_file(predictors_file) if predictors_file else None,
           "created": datetime.date.today().isoformat(), "tool": f"rwkv-edge {__version__}"}
    man.update(info or {})
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.", suffix=".tmp")
    try:
        put = shutil.move if move else shutil.copyfile
        put(model_file, os.path.join(tmp, MODEL_FILE))
        put(tokenizer_file, os.path.join(tmp, TOKENIZER_FILE))
        if predictors_file:
            put(predictors_file, os.path.join(tmp, PREDICTORS_FILE))
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(man, f, indent=1, sort_keys=True)
            f.write("\n")
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)                  # mkdtemp makes 0700
        if os.path.isdir(out):
            os.rmdir(out)                             # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return man
