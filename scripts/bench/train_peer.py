#!/usr/bin/env python3
"""PyTorch peer of tickmesh's training loop, for the throughput benchmark.

Reads a safetensors windows file with ``x_train`` [N, T, F], ``y_train`` [N],
``x_val`` [M, T, F], ``y_val`` [M] (float32), builds the model kind of
``scripts/py/tickmesh_torch.py`` and trains it the way tickmesh does: Adam,
per epoch a seeded shuffle, minibatches of MSE (mean) with gradient-norm
clipping, then a validation pass (no_grad, batches of 512).  One warm-up
minibatch step runs before the clock starts and is not counted; the timed part
is the epochs (training and validation).

Prints exactly one JSON line on stdout:
{"peer":"pytorch","kind":...,"torch":...,"threads":...,"epochs":E,
 "train_samples":N,"seconds":S,"samples_per_sec":N*E/S,
 "final_train_loss":...,"final_val_loss":...}
``final_train_loss`` is the sample-weighted mean of the last epoch's minibatch
losses; ``final_val_loss`` the validation MSE after the last epoch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

# torch warns at import when numpy is absent; this tool does not need numpy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import Tensor, nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "py"))
import tickmesh_torch  # noqa: E402

VAL_BATCH = 512


class PeerError(Exception):
    """A bad input: one line on stderr, exit status 2."""


def _load_windows(path: Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if not path.is_file():
        raise PeerError(f"{path}: no such file")
    try:
        t = load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises several types
        raise PeerError(f"{path}: {e}") from e
    missing = [k for k in ("x_train", "y_train", "x_val", "y_val") if k not in t]
    if missing:
        raise PeerError(f"{path}: missing tensors {missing} (has {sorted(t)})")
    xt, yt, xv, yv = t["x_train"], t["y_train"], t["x_val"], t["y_val"]
    for name, v in (("x_train", xt), ("y_train", yt), ("x_val", xv), ("y_val", yv)):
        if v.dtype != torch.float32:
            raise PeerError(f"{path}: {name} is {v.dtype}, expected float32")
    ok = (
        xt.dim() == 3
        and xv.dim() == 3
        and xt.shape[1:] == xv.shape[1:]
        and yt.shape == (xt.shape[0],)
        and yv.shape == (xv.shape[0],)
        and xt.shape[0] > 0
    )
    if not ok:
        raise PeerError(
            f"{path}: bad shapes x_train {tuple(xt.shape)} y_train "
            f"{tuple(yt.shape)} x_val {tuple(xv.shape)} y_val {tuple(yv.shape)}"
        )
    return xt, yt, xv, yv


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    params: list[nn.Parameter],
    x: Tensor,
    y: Tensor,
    clip: float,
) -> Tensor:
    loss = nn.functional.mse_loss(model(x), y, reduction="mean")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    return loss.detach()


def _val_mse(model: nn.Module, x: Tensor, y: Tensor) -> float | None:
    m = x.shape[0]
    if m == 0:
        return None
    model.eval()
    sse = torch.zeros((), dtype=torch.float64, device=x.device)
    with torch.no_grad():
        for i in range(0, m, VAL_BATCH):
            pred = model(x[i : i + VAL_BATCH])
            sse += (pred.double() - y[i : i + VAL_BATCH].double()).pow(2).sum()
    model.train()
    return sse.item() / m


def train_epochs(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    params: list[nn.Parameter],
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    epochs: int,
    batch_size: int,
    clip: float,
    gen: torch.Generator,
) -> tuple[float | None, float | None, float]:
    """Trains ``epochs`` epochs the way tickmesh does (a seeded shuffle per
    epoch, clipped minibatch steps, a validation pass); returns the last
    epoch's training and validation losses and the seconds taken."""
    xt, yt, xv, yv = data
    n = xt.shape[0]
    device = xt.device
    train_loss: float | None = None
    val_loss: float | None = None
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            loss = _train_step(model, opt, params, xt[idx], yt[idx], clip)
            total += loss.double() * idx.shape[0]
        train_loss = total.item() / n
        val_loss = _val_mse(model, xv, yv)
    _sync(device)
    return train_loss, val_loss, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="PyTorch peer of tickmesh's training loop")
    ap.add_argument("--windows", type=Path, required=True, help="safetensors with x_train/y_train/x_val/y_val")
    ap.add_argument("--kind", required=True, choices=tickmesh_torch.KINDS)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--conv-channels", type=int, default=32)
    ap.add_argument("--kernel-size", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--clip", type=float, default=1.0, help="max gradient norm")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = ap.parse_args(argv)
    for name in ("hidden", "layers", "conv_channels", "kernel_size", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    try:
        xt, yt, xv, yv = _load_windows(args.windows)
    except PeerError as e:
        print(f"train_peer: error: {e}", file=sys.stderr)
        return 2
    n, _, f = xt.shape
    meta = {
        "kind": args.kind,
        "features": [f"f{i}" for i in range(f)],
        "hidden": args.hidden,
        "layers": args.layers,
        "conv_channels": args.conv_channels,
        "kernel_size": args.kernel_size,
    }
    model = tickmesh_torch.build(meta).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=args.lr)
    xt, yt, xv, yv = (v.to(device) for v in (xt, yt, xv, yv))
    gen = torch.Generator(device="cpu").manual_seed(args.seed)

    # Warm-up: one minibatch step (allocator, kernels, cuDNN plans); not timed.
    _train_step(model, opt, params, xt[: args.batch_size], yt[: args.batch_size], args.clip)
    _sync(device)

    train_loss, val_loss, seconds = train_epochs(
        model, opt, params, (xt, yt, xv, yv), args.epochs, args.batch_size, args.clip, gen
    )

    print(
        json.dumps(
            {
                "peer": "pytorch",
                "kind": args.kind,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "epochs": args.epochs,
                "train_samples": n,
                "seconds": seconds,
                "samples_per_sec": n * args.epochs / seconds,
                "final_train_loss": train_loss,
                "final_val_loss": val_loss,
            },
            separators=(",", ":"),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
