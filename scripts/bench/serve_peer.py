#!/usr/bin/env python3
"""The original stack's forecast server, for scripts/bench/serve.sh.

FastAPI + PyTorch, served the way the original's ``ml/inference/service.py``
did it: the model (``.pth`` there, a tickmesh checkpoint's safetensors here,
loaded into the same ``torch.nn`` module, ``scripts/py/tickmesh_torch.py``)
and its scaler are loaded once; every request reads the newest ``seq_len``
rows of the model's features from the database, scales them, runs the model,
and for each further step appends the predicted close as a new row (the
other features carried forward) and runs the model again on the shifted
window.  That is less work per step than tickmesh does (tickmesh advances
every indicator through the predicted bar), so the comparison favours the
peer.

    serve_peer.py --checkpoint DIR --db SQLITE [--port 18081]

DIR holds ``meta.json`` and ``model.safetensors``.  Serves
``GET /ml/forecast?ticker=&interval=&n_steps=`` on 127.0.0.1 with uvicorn
(one worker, as the original ran it).
"""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI, HTTPException  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "py"))
import tickmesh_torch  # noqa: E402

# tickmesh's encoding (actors/model/src/dataset.rs): price-like columns as
# ln(x / the window's last close), the rest min-max scaled.
RELATIVE = {"open", "high", "low", "close", "sma_20", "ema_12", "ema_26"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--db", required=True, type=Path)
    ap.add_argument("--port", type=int, default=18081)
    args = ap.parse_args()

    meta = json.loads((args.checkpoint / "meta.json").read_text())
    model = tickmesh_torch.build(meta)
    model.load_state_dict(load_file(str(args.checkpoint / "model.safetensors")), strict=True)
    model.eval()
    features = meta["features"]
    seq_len = int(meta["seq_len"])
    lo, hi = meta["scaler"]["min"], meta["scaler"]["max"]
    mean, std = meta["target_scale"]["mean"], meta["target_scale"]["std"]
    target = features.index("close")
    ticker_of_model, interval_of_model = meta["ticker"], meta["interval"]
    cols = ", ".join(features)

    def encode(window: list[list[float]]) -> torch.Tensor:
        last = window[-1][target]
        out = []
        for row in window:
            enc = []
            for j, v in enumerate(row):
                if features[j] in RELATIVE:
                    enc.append(math.log(v / last))
                else:
                    r = hi[j] - lo[j]
                    enc.append((v - lo[j]) / (r if abs(r) >= 1e-12 else 1.0))
            out.append(enc)
        return torch.tensor([out], dtype=torch.float32)

    app = FastAPI()

    @app.get("/ml/forecast")
    def forecast(ticker: str, interval: str = "1d", n_steps: int = 10) -> dict:
        ticker = ticker.upper()
        if (ticker, interval) != (ticker_of_model, interval_of_model):
            raise HTTPException(404, f"no model for {ticker} {interval}")
        if not 1 <= n_steps <= 500:
            raise HTTPException(400, "n_steps must be in 1..=500")
        con = sqlite3.connect(str(args.db))
        try:
            rows = con.execute(
                f'SELECT ts, {cols} FROM aggregated_data WHERE ticker = ? AND "interval" = ? '
                "ORDER BY ts DESC LIMIT ?",
                (ticker, interval, seq_len),
            ).fetchall()
        finally:
            con.close()
        rows.reverse()
        window = [list(r[1:]) for r in rows]
        last_close = window[-1][target]
        closes = []
        with torch.no_grad():
            for _ in range(n_steps):
                z = float(model(encode(window))[0])
                close = window[-1][target] * math.exp(z * std + mean)
                closes.append(close)
                row = list(window[-1])
                row[target] = close
                window = window[1:] + [row]
        return {
            "ticker": ticker,
            "interval": interval,
            "model": {"version": meta["version"], "kind": meta["kind"]},
            "last_ts": rows[-1][0],
            "last_close": last_close,
            "forecasts": [{"step": i + 1, "close": c} for i, c in enumerate(closes)],
        }

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", workers=1)


if __name__ == "__main__":
    main()
