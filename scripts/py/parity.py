#!/usr/bin/env python3
"""Checks that tickmesh's Rust forward pass equals the PyTorch reference.

Usage: parity.py DIR [--tol 1e-5]

DIR holds ``meta.json`` (the model's hyperparameters), ``model.safetensors``
(its weights, PyTorch parameter names) and ``io.safetensors`` with ``x``
(float32 [B, T, F]) and ``y`` (float32 [B], the Rust forward output).  The
reference module of ``scripts/py/tickmesh_torch.py`` is built from the meta,
loaded strictly, and run on ``x`` in eval mode, float32, on CPU.

Prints ``parity <kind>: max_abs_diff=<value> over <B> samples (tol <tol>)``.
Exit status: 0 when max |torch(x) - y| <= tol, 1 when it is larger (or not
finite), 2 on any other problem (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

# torch warns at import when numpy is absent; this tool does not need numpy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tickmesh_torch  # noqa: E402


class ParityError(Exception):
    """A problem other than a numerical mismatch (exit status 2)."""


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ParityError(f"{path}: no such file")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ParityError(f"{path}: {e}") from e
    if not isinstance(meta, dict):
        raise ParityError(f"{path}: expected a JSON object")
    return meta


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ParityError(f"{path}: no such file")
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises several types
        raise ParityError(f"{path}: {e}") from e


def _load_weights(module: torch.nn.Module, path: Path, kind: str) -> None:
    state = _read_tensors(path)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        raise ParityError(f"{path} does not fit {kind}: {'; '.join(parts)}")
    bad = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if state[k].shape != v.shape
    ]
    if bad:
        raise ParityError(f"{path} does not fit {kind}: shape mismatch: {', '.join(bad)}")
    non_float = sorted(k for k, v in state.items() if v.dtype != torch.float32)
    if non_float:
        raise ParityError(f"{path}: expected float32 tensors, got {non_float}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:  # should be unreachable after the checks above
        raise ParityError(f"{path}: {' '.join(str(e).split())}") from e


def run(directory: Path, tol: float) -> int:
    if not directory.is_dir():
        raise ParityError(f"{directory}: not a directory")
    meta = _read_meta(directory / "meta.json")
    try:
        module = tickmesh_torch.build(meta)
    except ValueError as e:
        raise ParityError(f"{directory / 'meta.json'}: {e}") from e
    kind = str(meta["kind"])
    _load_weights(module, directory / "model.safetensors", kind)

    io_path = directory / "io.safetensors"
    io = _read_tensors(io_path)
    for name in ("x", "y"):
        if name not in io:
            raise ParityError(f"{io_path}: no tensor {name!r} (has {sorted(io)})")
        if io[name].dtype != torch.float32:
            raise ParityError(f"{io_path}: {name!r} is {io[name].dtype}, expected float32")
    x, y = io["x"], io["y"]
    n_features = len(meta["features"])
    if x.dim() != 3 or x.shape[2] != n_features:
        raise ParityError(
            f"{io_path}: x has shape {tuple(x.shape)}, expected [B, T, {n_features}]"
        )
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ParityError(f"{io_path}: y has shape {tuple(y.shape)}, expected [{x.shape[0]}]")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ParityError(f"{io_path}: x is empty {tuple(x.shape)}")

    module.eval()
    with torch.no_grad():
        pred = module(x)
    if pred.shape != y.shape:
        raise ParityError(f"module output has shape {tuple(pred.shape)}, y {tuple(y.shape)}")
    diff = (pred.double() - y.double()).abs().max().item()
    print(f"parity {kind}: max_abs_diff={diff:.3e} over {y.shape[0]} samples (tol {tol:g})")
    return 0 if math.isfinite(diff) and diff <= tol else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="folder with meta.json, model.safetensors, io.safetensors")
    parser.add_argument("--tol", type=float, default=1e-5, help="max allowed |torch(x) - y| (default 1e-5)")
    args = parser.parse_args(argv)
    if not args.tol >= 0:
        print("parity: error: --tol must be >= 0", file=sys.stderr)
        return 2
    try:
        return run(args.dir, args.tol)
    except ParityError as e:
        print(f"parity: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # anything unforeseen is still a one-line exit 2
        print(f"parity: error: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
