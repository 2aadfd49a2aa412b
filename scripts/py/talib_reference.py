"""TA-Lib's values for every tickmesh indicator column (the reference of
actors/features/tests/talib.rs).

usage: talib_reference.py CSV CONFIG_JSON [SERIES_JSON]

CSV is data/sample/stocks_daily.csv (Ticker,Date,Open,High,Low,Close,Volume,...);
CONFIG_JSON is a `[features]` section as JSON. Prints, as JSON,
{ticker: {column: [value or null, ...]}} in the CSV's row order per ticker,
with the column names of tickmesh. With SERIES_JSON (a list of numbers) it
prints TA-Lib's STDDEV(series, volatility period) instead.
"""

import csv
import json
import sys

import numpy as np
import talib


def column_values(a):
    return [None if np.isnan(v) else float(v) for v in a]


def main():
    cfg = json.loads(sys.argv[2])
    if len(sys.argv) > 3:
        x = np.array(json.loads(sys.argv[3]), dtype=float)
        print(json.dumps(column_values(talib.STDDEV(x, cfg["volatility"], 1.0))))
        return
    by_ticker = {}
    with open(sys.argv[1], newline="") as f:
        for r in csv.DictReader(f):
            by_ticker.setdefault(r["Ticker"], []).append(r)
    out = {}
    for ticker, rows in by_ticker.items():
        col = lambda k: np.array([float(r[k]) for r in rows], dtype=float)
        o, h, l, c, v = col("Open"), col("High"), col("Low"), col("Close"), col("Volume")
        n = len(c)
        lr = np.full(n, np.nan)
        lr[1:] = np.log(c[1:] / c[:-1])
        fast, slow, signal = cfg["macd"]
        macd, macd_signal, macd_hist = talib.MACD(c, fast, slow, signal)
        k, d = talib.STOCHF(h, l, c, cfg["stoch"][0], cfg["stoch"][1], talib.MA_Type.SMA)
        bk = cfg["bollinger_k"]
        upper, middle, lower = talib.BBANDS(c, cfg["bollinger"], bk, bk, talib.MA_Type.SMA)
        cols = {
            "open": o,
            "high": h,
            "low": l,
            "close": c,
            "volume": v,
            "log_return": lr,
            f"sma_{cfg['sma']}": talib.SMA(c, cfg["sma"]),
        }
        for p in cfg["ema"]:
            cols[f"ema_{p}"] = talib.EMA(c, p)
        cols[f"rsi_{cfg['rsi']}"] = talib.RSI(c, cfg["rsi"])
        cols.update(
            macd=macd,
            macd_signal=macd_signal,
            macd_hist=macd_hist,
            obv=talib.OBV(c, v),
            stoch_k=k,
            stoch_d=d,
            bb_upper=upper,
            bb_middle=middle,
            bb_lower=lower,
        )
        cols[f"atr_{cfg['atr']}"] = talib.ATR(h, l, c, cfg["atr"])
        cols[f"volatility_{cfg['volatility']}"] = talib.STDDEV(lr, cfg["volatility"], 1.0)
        out[ticker] = {name: column_values(a) for name, a in cols.items()}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
