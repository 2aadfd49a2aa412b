"""The reference side of tickmesh's optimizer parity test.

Reads `params` (p.NAME) and per-step gradients (g.STEP.NAME) from a
safetensors file, applies torch.nn.utils.clip_grad_norm_ (when --clip > 0)
and torch.optim.Adam (lr, default betas/eps, no weight decay) for every
step, and writes the final parameters to --out as JSON ({NAME: [floats]},
row-major; float32 values are exact as JSON doubles; no numpy needed).
"""

import argparse
import json

import torch
from safetensors.torch import load_file


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inp", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--clip", type=float, default=0.0)
    ap.add_argument("--steps", type=int, required=True)
    a = ap.parse_args()
    t = load_file(a.inp)
    names = sorted(k[2:] for k in t if k.startswith("p."))
    params = [torch.nn.Parameter(t["p." + n].clone()) for n in names]
    opt = torch.optim.Adam(params, lr=a.lr)
    for s in range(a.steps):
        opt.zero_grad()
        for n, p in zip(names, params):
            p.grad = t[f"g.{s}.{n}"].clone()
        if a.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, a.clip)
        opt.step()
    out = {n: [float(x) for x in p.detach().flatten().tolist()] for n, p in zip(names, params)}
    with open(a.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
