#!/usr/bin/env python3
"""PyTorch peer of the fused-training benchmark: many tickers, one model at
a time, in eager PyTorch, the way the original system trained them.

Reads the safetensors file that ``tickmesh bench-fused --windows-out``
writes: for each ticker ``T``, ``T.x_train`` [N, S, F], ``T.y_train`` [N],
``T.x_val`` [M, S, F], ``T.y_val`` [M] (float32). Trains the model kind of
``scripts/py/tickmesh_torch.py`` on each ticker in turn exactly as
``train_peer.py`` does for one (Adam, a seeded shuffle per epoch, MSE
minibatches with gradient-norm clipping, a validation pass per epoch; one
untimed warm-up step per model). The clock covers every ticker's epochs.

Prints one JSON line:
{"peer":"pytorch","kind":...,"torch":...,"threads":...,"tickers":K,
 "epochs":E,"train_samples":N_total,"seconds":S,"samples_per_sec":...}
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here))
sys.path.insert(0, str(here.parent / "py"))
import tickmesh_torch  # noqa: E402
from train_peer import _sync, _train_step, train_epochs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="PyTorch peer of the fused-training benchmark")
    ap.add_argument("--windows", type=Path, required=True)
    ap.add_argument("--kind", required=True, choices=tickmesh_torch.KINDS)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = ap.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        ap.error("--epochs and --batch-size must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available")
    if not args.windows.is_file():
        print(f"fused_peer: error: {args.windows}: no such file", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    t = load_file(str(args.windows), device="cpu")
    tickers = sorted({k.split(".", 1)[0] for k in t})
    if not tickers:
        print(f"fused_peer: error: {args.windows}: no tensors", file=sys.stderr)
        return 2
    for k in tickers:
        missing = [f"{k}.{n}" for n in ("x_train", "y_train", "x_val", "y_val") if f"{k}.{n}" not in t]
        if missing:
            print(f"fused_peer: error: {args.windows}: missing {missing}", file=sys.stderr)
            return 2

    total_samples = 0
    seconds = 0.0
    for k in tickers:
        xt, yt, xv, yv = (t[f"{k}.{n}"].to(device) for n in ("x_train", "y_train", "x_val", "y_val"))
        n, _, f = xt.shape
        torch.manual_seed(args.seed)
        model = tickmesh_torch.build(
            {
                "kind": args.kind,
                "features": [f"f{i}" for i in range(f)],
                "hidden": args.hidden,
                "layers": 1,
                "conv_channels": 32,
                "kernel_size": 3,
            }
        ).to(device)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=args.lr)
        gen = torch.Generator(device="cpu").manual_seed(args.seed)
        _train_step(model, opt, params, xt[: args.batch_size], yt[: args.batch_size], args.clip)
        _sync(device)
        _, _, took = train_epochs(
            model, opt, params, (xt, yt, xv, yv), args.epochs, args.batch_size, args.clip, gen
        )
        seconds += took
        total_samples += n * args.epochs
        del model, opt

    print(
        json.dumps(
            {
                "peer": "pytorch",
                "kind": args.kind,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "device": args.device,
                "tickers": len(tickers),
                "epochs": args.epochs,
                "train_samples": total_samples // args.epochs,
                "seconds": seconds,
                "samples_per_sec": total_samples / seconds,
            },
            separators=(",", ":"),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
