"""The Python peers of the aggregate benchmark (docs/aggregation.md).

`compute`: Polars doing what the Rust aggregator does, in the same run: read
a ticker's 1-minute bars from the local store's Parquet files, keep the NYSE
regular session, resample, compute the indicators, as-of join macro series
and fundamentals. `check` compares two directories of per-ticker results
(ours and the peer's). `e2e`: the original stack's way (boto3 GETs one
object at a time, pandas, `DataFrame.to_sql`) for the end-to-end ratio.
`selftest`: builds a small store under /tmp/aggpeer and checks `compute`
against `talib` itself and the joins against a brute-force loop.

Indicators in `compute` are Polars expressions only (no TA-Lib call); the
selftest checks each column against `talib` 0.8 to 1e-9 relative:

| column | Polars expression |
|---|---|
| log_return | (close / close.shift(1)).log() |
| sma_20, bb_middle | rolling_mean(20) |
| ema_12, ema_26 | ewm_mean(alpha=2/(n+1), adjust=False) on the closes with bars < n-1 set to NULL and bar n-1 set to rolling_mean(n) (TA-Lib's SMA seed) |
| rsi_14 | gains/losses of close.diff(), seeded at bar 14 with rolling_mean(14), then ewm_mean(alpha=1/14) (Wilder); 100*g/(g+l), 0 when g+l <= 0 |
| macd, macd_signal, macd_hist | slow = ema_26; fast seeded at bar 25 with rolling_mean(12) (TA-Lib's alignment), ewm 2/13; signal seeded at bar 33 with rolling_mean(9) of the line, ewm 0.2; NULL before bar 33 |
| obv | cum_sum of +v / -v / 0 by the sign of close.diff(), bar 0 = v |
| stoch_k, stoch_d | rolling_max(high,14), rolling_min(low,14), %K 0 when the range is within 1e-14 of the extremes' magnitude (TA-Lib 0.8), %D rolling_mean(3); NULL before bar 15 |
| bb_upper, bb_lower | bb_middle +/- 2 * sqrt(rolling_var(20, ddof=0)) (0 when not positive) |
| atr_14 | true range from bar 1, seeded at bar 14 with rolling_mean(14), ewm_mean(alpha=1/14) |
| volatility_20 | sqrt(rolling_var(log_return, 20, ddof=0)), first at bar 20 |

Zero tests follow TA-Lib 0.8.1 (the C library in the ta-lib 0.8.2 wheel): a
variance or an RSI denominator is zero only when not positive (0.4 floored
anything under 1e-8).

The session set comes from exchange_calendars' XNYS calendar (2000 on),
built once before the timers start (`calendar_s` in the JSON line).

usage:
  aggregate_peer.py compute --store DIR --tickers A,B --interval 5m \
      [--macro CPI=110,UNEMP=100] [--fund-lag 90] [--out OUTDIR]
  aggregate_peer.py check --ours DIR1 --peer DIR2
  aggregate_peer.py e2e --s3-endpoint URL --bucket-prefix P --access-key K \
      --secret-key S --pg-dsn DSN --tickers A,B --interval 5m --table T
  aggregate_peer.py selftest [--dir /tmp/aggpeer]
"""
import argparse
import glob
import json
import os
import resource
import sys
import time

# Polars 2's default (streaming) engine is 2-7x slower on these plans
# (ewm, rolling windows, cum_sum, as-of joins) than the in-memory one.
ENGINE = os.environ.get("AGG_PEER_ENGINE", "in-memory")

INTERVALS = {"1m": 1, "5m": 5, "15m": 15, "30m": 30, "1h": 60, "1d": None}

INDICATORS = [
    "log_return", "sma_20", "ema_12", "ema_26", "rsi_14", "macd", "macd_signal",
    "macd_hist", "obv", "stoch_k", "stoch_d", "bb_upper", "bb_middle", "bb_lower",
    "atr_14", "volatility_20",
]
BASE = ["open", "high", "low", "close", "volume"] + INDICATORS
FUND_METRICS = [
    ("revenue", "fund_revenue"),
    ("netIncome", "fund_net_income"),
    ("eps", "fund_eps"),
    ("totalAssets", "fund_total_assets"),
    ("totalLiabilities", "fund_total_liabilities"),
    ("totalEquity", "fund_total_equity"),
    ("operatingCashFlow", "fund_operating_cash_flow"),
    ("sharesOutstanding", "fund_shares_outstanding"),
]
FUND_COLUMNS = [c for _, c in FUND_METRICS]


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def parquet_files(root):
    """Every Parquet file under `root`, in key (path) order."""
    return sorted(glob.glob(os.path.join(root, "**", "*.parquet"), recursive=True))


def parse_macro(spec):
    out = {}
    for part in filter(None, (spec or "").split(",")):
        name, lag = part.split("=")
        out[name.strip()] = int(lag)
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------
# compute (Polars)
# --------------------------------------------------------------------------


def sessions_frame():
    """XNYS sessions: date, open and close (UTC instants)."""
    import exchange_calendars as xc
    import polars as pl

    cal = xc.get_calendar("XNYS", start="2000-01-01")
    s = cal.schedule
    return pl.DataFrame(
        {
            "d": pl.Series(s.index.values.astype("datetime64[D]")).cast(pl.Date),
            "open": pl.Series(s["open"].dt.tz_convert("UTC")).cast(pl.Datetime("us", "UTC")),
            "close": pl.Series(s["close"].dt.tz_convert("UTC")).cast(pl.Datetime("us", "UTC")),
        }
    )


def read_bars(store, ticker):
    """A ticker's bars from its Parquet files, concatenated in key order."""
    import polars as pl

    files = parquet_files(os.path.join(store, "stock-data", ticker))
    if not files:
        raise SystemExit(f"unknown ticker {ticker}: no Parquet under {store}/stock-data/{ticker}/")
    return pl.scan_parquet(files).select(
        pl.col("t").cast(pl.Datetime("us", "UTC")), "o", "h", "l", "c", "v", "vw"
    )


def dedup_sorted(df):
    """Sorted by t, the last row of each t kept (files are read in key
    order, so the last is the newest delivery); a no-op check when the
    weekly files already concatenate in order, as the Rust merge does."""
    import polars as pl

    t = pl.col("t")
    if df.height < 2 or df.select((t.diff().dt.total_microseconds() > 0).all()).item():
        return df
    return (
        df.with_row_index("_i")
        .sort("t", "_i")
        .filter((t != t.shift(-1)).fill_null(True))
        .drop("_i")
    )


def read_macro(store, series, lag):
    import polars as pl

    files = parquet_files(os.path.join(store, "macro-data", series))
    if not files:
        raise SystemExit(f"macro series {series} has no Parquet under {store}/macro-data/{series}/")
    df = pl.read_parquet(files, columns=["date", "value"]).with_row_index("_i")
    return (
        df.sort("date", "_i")
        .unique("date", keep="last", maintain_order=True)
        .select(
            (pl.col("date") + pl.duration(days=lag)).alias("published"),
            pl.col("value").alias(f"macro_{series.lower()}"),
        )
        .sort("published")
    )


def read_fundamentals(store, ticker, fund_lag):
    """The rows a bar may join: one per publication date, the fiscal year a
    bar dated on or after it gets (the greatest period end published so far;
    among equal ends the one published last, as the Rust loop's `>=` does)."""
    import polars as pl

    files = parquet_files(os.path.join(store, "company-fundamentals", ticker))
    if not files:
        return None
    metrics = [m for m, _ in FUND_METRICS]
    df = pl.read_parquet(files, columns=["calendarYear", "date", "fillingDate"] + metrics)
    df = df.with_row_index("_i").sort("calendarYear", "_i").unique(
        "calendarYear", keep="last", maintain_order=True
    )
    pe = pl.coalesce(pl.col("date"), pl.date(pl.col("calendarYear"), 12, 31))
    df = df.with_columns(pe.alias("period_end")).with_columns(
        pl.max_horizontal(
            pl.coalesce(pl.col("fillingDate"), pl.col("period_end") + pl.duration(days=fund_lag)),
            pl.col("period_end") + pl.duration(days=1),
        ).alias("public")
    )
    df = df.sort("public", "period_end", maintain_order=True)
    df = df.filter(pl.col("period_end") == pl.col("period_end").cum_max())
    df = df.unique("public", keep="last", maintain_order=True)
    return df.select(
        pl.col("public"), *[pl.col(m).alias(c) for m, c in FUND_METRICS]
    ).sort("public")


def seeded_ewm(x, alpha, seed_at, seed):
    """ewm_mean(adjust=False) of `x` from bar `seed_at`, started at `seed`."""
    import polars as pl

    idx = pl.int_range(pl.len())
    inp = pl.when(idx < seed_at).then(None).when(idx == seed_at).then(seed).otherwise(x)
    return inp.ewm_mean(alpha=alpha, adjust=False, min_samples=1)


def indicator_stages():
    """The indicators as successive `with_columns` stages over
    open/high/low/close/volume (helper columns start with `_`; each
    sub-expression is computed once)."""
    import polars as pl

    idx = pl.int_range(pl.len())
    c, h, l, v = pl.col("close"), pl.col("high"), pl.col("low"), pl.col("volume")
    d, pc = pl.col("_d"), pl.col("_pc")
    gain, loss, tr = pl.col("_gain"), pl.col("_loss"), pl.col("_tr")
    hh, ll, var = pl.col("_hh"), pl.col("_ll"), pl.col("_var")
    g, lo, mid = pl.col("_g"), pl.col("_lo"), pl.col("bb_middle")
    line, k, lr = pl.col("_line"), pl.col("_k"), pl.col("log_return")
    s1 = [
        c.diff().alias("_d"),
        c.shift(1).alias("_pc"),
        l.rolling_min(14).alias("_ll"),
        h.rolling_max(14).alias("_hh"),
        c.rolling_mean(20).alias("bb_middle"),
        c.rolling_var(20, ddof=0).alias("_var"),
        c.rolling_mean(12).alias("_m12"),
        c.rolling_mean(26).alias("_m26"),
    ]
    s2 = [
        pl.when(d < 0).then(0.0).otherwise(d).alias("_gain"),
        pl.when(d < 0).then(-d).otherwise(0.0).alias("_loss"),
        pl.when(idx == 0).then(None).otherwise(
            pl.max_horizontal(h - l, (pc - h).abs(), (pc - l).abs())).alias("_tr"),
        (c / pc).log().alias("log_return"),
        pl.when(idx == 0).then(v).when(d > 0).then(v).when(d < 0).then(-v).otherwise(0.0)
        .cum_sum().alias("obv"),
        (hh - ll).alias("_rng"),
        pl.when(var.is_null()).then(None).when(var > 0).then(var.sqrt()).otherwise(0.0).alias("_dev"),
        seeded_ewm(c, 2.0 / 13, 11, pl.col("_m12")).alias("ema_12"),
        seeded_ewm(c, 2.0 / 27, 25, pl.col("_m26")).alias("ema_26"),
        seeded_ewm(c, 2.0 / 13, 25, pl.col("_m12")).alias("_fast"),
    ]
    rng, dev = pl.col("_rng"), pl.col("_dev")
    s3 = [
        seeded_ewm(gain, 1.0 / 14, 14, gain.rolling_mean(14)).alias("_g"),
        seeded_ewm(loss, 1.0 / 14, 14, loss.rolling_mean(14)).alias("_lo"),
        seeded_ewm(tr, 1.0 / 14, 14, tr.rolling_mean(14)).alias("atr_14"),
        (pl.col("_fast") - pl.col("ema_26")).alias("_line"),
        pl.when(rng.abs() <= 1e-14 * (hh.abs() + ll.abs())).then(0.0)
        .otherwise(((c - ll) / rng) * 100.0).alias("_k"),
        (mid + 2.0 * dev).alias("bb_upper"),
        (mid - 2.0 * dev).alias("bb_lower"),
        lr.rolling_var(20, ddof=0).alias("_lvar"),
    ]
    lvar = pl.col("_lvar")
    s4 = [
        (g + lo).alias("_s"),
        seeded_ewm(line, 0.2, 33, line.rolling_mean(9)).alias("macd_signal"),
        pl.when(idx >= 15).then(k).alias("stoch_k"),
        pl.when(idx >= 15).then(k.rolling_mean(3)).alias("stoch_d"),
        pl.when(lvar.is_null()).then(None).when(lvar > 0).then(lvar.sqrt()).otherwise(0.0)
        .alias("volatility_20"),
    ]
    sm, sig = pl.col("_s"), pl.col("macd_signal")
    s5 = [
        pl.when(sm.is_null()).then(None).when(sm > 0).then(100.0 * (g / sm)).otherwise(0.0).alias("rsi_14"),
        pl.when(idx >= 33).then(line).alias("macd"),
        (line - sig).alias("macd_hist"),
        mid.alias("sma_20"),
    ]
    return [s1, s2, s3, s4, s5]


def ticker_plan(bars, sessions, minutes, macros, fund):
    """The lazy plan of one ticker from its bars (a DataFrame sorted by t)."""
    import polars as pl

    t = pl.col("t")
    # the session a bar may belong to: the last one opened at or before it
    lf = (
        bars.lazy()
        .join_asof(sessions.lazy(), left_on="t", right_on="open", strategy="backward", check_sortedness=False)
        .filter(t < pl.col("close"))
    )
    if minutes is None:
        bucket = pl.col("open")
    else:
        w = minutes * 60_000_000
        o = pl.col("open").dt.epoch("us")
        bucket = (o + (t.dt.epoch("us") - o) // w * w).cast(pl.Datetime("us", "UTC"))
    # vwap (the close when the bucket traded nothing, as resample.rs does)
    # is not an output column, so the optimizer drops it like Rust's unused vw.
    pv = pl.col("vw") * pl.col("v").cast(pl.Float64)
    lf = (
        lf.with_columns(bucket.alias("ts"))
        .group_by("ts", maintain_order=True)
        .agg(
            pl.col("d").first(),
            pl.col("o").first().alias("open"),
            pl.col("h").max().alias("high"),
            pl.col("l").min().alias("low"),
            pl.col("c").last().alias("close"),
            pl.col("v").sum().alias("_v"),
            pv.sum().alias("_pv"),
        )
        .with_columns(
            pl.col("_v").cast(pl.Float64).alias("volume"),
            pl.when(pl.col("_v") > 0)
            .then(pl.col("_pv") / pl.col("_v").cast(pl.Float64))
            .otherwise(pl.col("close"))
            .alias("vwap"),
        )
    )
    for stage in indicator_stages():
        lf = lf.with_columns(stage)
    for m in macros:
        lf = lf.join_asof(m.lazy(), left_on="d", right_on="published", strategy="backward",
                          check_sortedness=False).drop("published", strict=False)
    if fund is not None:
        lf = lf.join_asof(fund.lazy(), left_on="d", right_on="public", strategy="backward", check_sortedness=False)
    else:
        lf = lf.with_columns([pl.lit(None, pl.Float64).alias(cname) for cname in FUND_COLUMNS])
    macro_cols = [m.columns[1] for m in macros]
    return lf.select(["ts"] + BASE + macro_cols + FUND_COLUMNS)


def run_compute(store, tickers, interval, macro_lags, fund_lag, out=None, quiet=False):
    import polars as pl

    if interval not in INTERVALS:
        raise SystemExit(f"unknown interval {interval}")
    t0 = time.perf_counter()
    sessions = sessions_frame()
    calendar_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    raw = [dedup_sorted(b) for b in pl.collect_all([read_bars(store, tk) for tk in tickers], engine=ENGINE)]
    macros = [read_macro(store, s, lag) for s, lag in macro_lags.items()]
    funds = [read_fundamentals(store, tk, fund_lag) for tk in tickers]
    t1 = time.perf_counter()
    results = pl.collect_all(
        [ticker_plan(b, sessions, INTERVALS[interval], macros, f) for b, f in zip(raw, funds)],
        engine=ENGINE,
    )
    t2 = time.perf_counter()
    line = {
        "peer": "polars",
        "tickers": len(tickers),
        "bars_in": sum(b.height for b in raw),
        "rows_out": sum(r.height for r in results),
        "read_s": round(t1 - t0, 4),
        "compute_s": round(t2 - t1, 4),
        "total_s": round(t2 - t0, 4),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "calendar_s": round(calendar_s, 4),
        "threads": pl.thread_pool_size(),
        "polars": pl.__version__,
    }
    if out:
        os.makedirs(out, exist_ok=True)
        for tk, r in zip(tickers, results):
            r.write_parquet(os.path.join(out, f"{tk}.parquet"))
    if not quiet:
        print(json.dumps(line), flush=True)
    return dict(zip(tickers, results)), line


def cmd_compute(a):
    tickers = [x for x in a.tickers.split(",") if x]
    run_compute(a.store, tickers, a.interval, parse_macro(a.macro), a.fund_lag, a.out)


# --------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------


def compare_frames(ours, peer, name):
    """Mismatch messages and the max relative difference per column."""
    import numpy as np

    import polars as pl

    errors, maxrel = [], {}
    if set(ours.columns) != set(peer.columns):
        errors.append(f"{name}: columns differ: only ours {sorted(set(ours.columns) - set(peer.columns))}, "
                      f"only peer {sorted(set(peer.columns) - set(ours.columns))}")
        return errors, maxrel
    if ours.columns != peer.columns:
        print(f"note: {name}: column order differs (compared by name)", file=sys.stderr)
        peer = peer.select(ours.columns)
    ours = ours.with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC")))
    peer = peer.with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC")))
    if ours.height != peer.height or not ours["ts"].equals(peer["ts"]):
        a, b = set(ours["ts"].to_list()), set(peer["ts"].to_list())
        errors.append(
            f"{name}: ts differ: {ours.height} vs {peer.height} rows; only ours {sorted(a - b)[:3]}, only peer {sorted(b - a)[:3]}"
        )
        return errors, maxrel
    ts = ours["ts"]
    for col in ours.columns[1:]:
        x = ours[col].cast(float)
        y = peer[col].cast(float)
        nx, ny = x.is_null().to_numpy(), y.is_null().to_numpy()
        bad = np.nonzero(nx != ny)[0]
        if len(bad):
            i = int(bad[0])
            errors.append(f"{name} {col} at {ts[i]}: NULL differs: ours {x[i]} peer {y[i]} ({len(bad)} rows)")
            continue
        xv = x.fill_null(0.0).to_numpy()
        yv = y.fill_null(0.0).to_numpy()
        nanx, nany = np.isnan(xv), np.isnan(yv)
        if (nanx != nany).any():
            i = int(np.nonzero(nanx != nany)[0][0])
            errors.append(f"{name} {col} at {ts[i]}: NaN differs: ours {xv[i]} peer {yv[i]}")
            continue
        xv, yv = np.where(nanx, 0.0, xv), np.where(nany, 0.0, yv)
        with np.errstate(invalid="ignore"):
            scale = np.maximum(1.0, np.maximum(np.abs(xv), np.abs(yv)))
            rel = np.abs(xv - yv) / scale
        rel = np.where(np.isfinite(xv) & np.isfinite(yv), rel, np.where(xv == yv, 0.0, np.inf))
        maxrel[col] = float(rel.max()) if len(rel) else 0.0
        if maxrel[col] > 1e-9:
            i = int(np.argmax(rel))
            errors.append(f"{name} {col} at {ts[i]}: ours {float(xv[i])!r} peer {float(yv[i])!r} (rel {rel[i]:.3e})")
    return errors, maxrel


def cmd_check(a):
    import polars as pl

    names = lambda d: {os.path.basename(p)[:-8] for p in glob.glob(os.path.join(d, "*.parquet"))}
    ours, peer = names(a.ours), names(a.peer)
    errors, maxrel = [], {}
    if ours != peer:
        errors.append(f"tickers differ: only ours {sorted(ours - peer)}, only peer {sorted(peer - ours)}")
    for tk in sorted(ours & peer):
        e, m = compare_frames(
            pl.read_parquet(os.path.join(a.ours, f"{tk}.parquet")),
            pl.read_parquet(os.path.join(a.peer, f"{tk}.parquet")),
            tk,
        )
        errors += e
        for k, v in m.items():
            maxrel[k] = max(maxrel.get(k, 0.0), v)
    print(json.dumps({"tickers": len(ours & peer), "max_rel": maxrel}))
    for e in errors:
        print("MISMATCH", e)
    sys.exit(1 if errors else 0)


# --------------------------------------------------------------------------
# e2e (the original stack: boto3 + pandas + to_sql)
# --------------------------------------------------------------------------


def pandas_indicators(df):
    """The same columns with pandas rolling/ewm (not TA-Lib-exact: ewm
    adjust=False from the first close, RSI/ATR by ewm with alpha 1/n)."""
    import numpy as np

    c, h, l, v = df["close"], df["high"], df["low"], df["volume"]
    out = df.copy()
    out["log_return"] = np.log(c / c.shift(1))
    out["sma_20"] = c.rolling(20).mean()
    out["ema_12"] = c.ewm(span=12, adjust=False).mean()
    out["ema_26"] = c.ewm(span=26, adjust=False).mean()
    d = c.diff()
    g = d.clip(lower=0).ewm(alpha=1 / 14, adjust=False).mean()
    lo = (-d).clip(lower=0).ewm(alpha=1 / 14, adjust=False).mean()
    out["rsi_14"] = 100 * g / (g + lo)
    out["macd"] = out["ema_12"] - out["ema_26"]
    out["macd_signal"] = out["macd"].ewm(span=9, adjust=False).mean()
    out["macd_hist"] = out["macd"] - out["macd_signal"]
    out["obv"] = (np.sign(d).fillna(0) * v).cumsum() + v.iloc[0]
    hh, ll = h.rolling(14).max(), l.rolling(14).min()
    out["stoch_k"] = 100 * (c - ll) / (hh - ll)
    out["stoch_d"] = out["stoch_k"].rolling(3).mean()
    sd = c.rolling(20).std(ddof=0)
    out["bb_middle"] = out["sma_20"]
    out["bb_upper"] = out["sma_20"] + 2 * sd
    out["bb_lower"] = out["sma_20"] - 2 * sd
    pc = c.shift(1)
    tr = np.maximum(h - l, np.maximum((h - pc).abs(), (l - pc).abs()))
    out["atr_14"] = tr.ewm(alpha=1 / 14, adjust=False).mean()
    out["volatility_20"] = out["log_return"].rolling(20).std(ddof=0)
    return out


def cmd_e2e(a):
    import io

    import boto3
    import exchange_calendars as xc
    import pandas as pd
    import pyarrow.parquet as pq
    from botocore.config import Config
    from sqlalchemy import create_engine, text

    minutes = INTERVALS[a.interval]
    tickers = [x for x in a.tickers.split(",") if x]
    s3 = boto3.client(
        "s3",
        endpoint_url=a.s3_endpoint,
        aws_access_key_id=a.access_key,
        aws_secret_access_key=a.secret_key,
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 5}),
    )
    bucket = f"{a.bucket_prefix}stock-data"
    dsn = a.pg_dsn
    if dsn.startswith("postgres://"):
        dsn = "postgresql://" + dsn[len("postgres://"):]
    if dsn.startswith("postgresql://"):
        dsn = "postgresql+psycopg://" + dsn[len("postgresql://"):]
    engine = create_engine(dsn)
    cal = xc.get_calendar("XNYS", start="2000-01-01")

    t0 = time.perf_counter()
    frames = {}
    for tk in tickers:
        parts = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{tk}/"):
            for obj in page.get("Contents", []):
                body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
                parts.append(pq.read_table(io.BytesIO(body)).to_pandas())
        df = pd.concat(parts, ignore_index=True)
        frames[tk] = df.sort_values("t", kind="stable").drop_duplicates("t", keep="last")
    t1 = time.perf_counter()

    sched = cal.schedule[["open", "close"]]
    outs = []
    for tk, df in frames.items():
        t = df["t"].dt.tz_convert("UTC")
        day = t.dt.tz_convert("America/New_York").dt.normalize().dt.tz_localize(None)
        s = sched.reindex(day.values)
        op = pd.Series(s["open"].array, index=df.index)
        cl = pd.Series(s["close"].array, index=df.index)
        keep = (t >= op) & (t < cl)
        df, t, op = df.loc[keep].copy(), t[keep], op[keep]
        if minutes is None:
            df["ts"] = op
        else:
            w = pd.Timedelta(minutes=minutes)
            df["ts"] = op + ((t - op) // w) * w
        df["pv"] = df["vw"] * df["v"]
        g = df.groupby("ts", sort=True)
        r = pd.DataFrame(
            {
                "open": g["o"].first(),
                "high": g["h"].max(),
                "low": g["l"].min(),
                "close": g["c"].last(),
                "volume": g["v"].sum().astype(float),
            }
        )
        r = pandas_indicators(r)[BASE].reset_index()
        r.insert(0, "ticker", tk)
        r.insert(2, "interval", a.interval)
        outs.append(r)
    res = pd.concat(outs, ignore_index=True)
    t2 = time.perf_counter()

    with engine.begin() as conn:
        conn.execute(text(f'DROP TABLE IF EXISTS "{a.table}"'))
    res.head(0).to_sql(a.table, engine, if_exists="replace", index=False)
    res.to_sql(a.table, engine, if_exists="append", index=False, method="multi", chunksize=1000)
    t3 = time.perf_counter()
    print(
        json.dumps(
            {
                "peer": "pandas_to_sql",
                "rows": len(res),
                "read_s": round(t1 - t0, 4),
                "compute_s": round(t2 - t1, 4),
                "load_s": round(t3 - t2, 4),
                "total_s": round(t3 - t0, 4),
                "peak_rss_mb": round(peak_rss_mb(), 1),
                "joins": "none",
            }
        ),
        flush=True,
    )


# --------------------------------------------------------------------------
# selftest
# --------------------------------------------------------------------------


def make_store(root, seed=7):
    """4 tickers, 2024-10-01..2024-12-13 (Thanksgiving and the 11-29 half
    day), 1-minute bars 08:00-17:00 New York on weekdays (pre- and
    post-market, closed days), weekly files in tickmesh's key layout, one
    later object redelivering some bars, flat stretches, zero volumes, a
    macro series TESTM and fundamentals with and without dates."""
    import shutil
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    if os.path.exists(root):
        shutil.rmtree(root)
    rng = np.random.default_rng(seed)
    days = pd.bdate_range("2024-10-01", "2024-12-13")
    schema = pa.schema([
        ("ticker", pa.string()), ("t", pa.timestamp("us", tz="UTC")),
        ("o", pa.float64()), ("h", pa.float64()), ("l", pa.float64()), ("c", pa.float64()),
        ("v", pa.int64()), ("n", pa.int64()), ("vw", pa.float64()),
    ])
    specs = {"AAA": (100.0, 4e-4), "BBB": (4800.0, 2e-5), "CCC": (12.5, 1e-3), "DDD": (55.0, 6e-4)}
    for tk, (p0, vol) in specs.items():
        ts = []
        for dday in days:
            start = pd.Timestamp(dday.date()).tz_localize("America/New_York") + pd.Timedelta(hours=8)
            ts.append(start + pd.to_timedelta(np.arange(9 * 60), unit="min"))
        t = pd.DatetimeIndex(np.concatenate([x.tz_convert("UTC").values for x in ts])).tz_localize("UTC")
        n = len(t)
        r = rng.normal(0, vol, n)
        r[:1200] = 0.0  # flat from the start (RSI's 0, zero ranges, zero deviations)
        r[2000:2100] = 0.0  # a flat stretch
        r[7000:7030] = 0.0
        c = p0 * np.exp(np.cumsum(r))
        c = np.round(c, 4)
        o = np.r_[c[0], c[:-1]]
        h = np.maximum(o, c) + np.abs(rng.normal(0, vol * p0, n))
        l = np.minimum(o, c) - np.abs(rng.normal(0, vol * p0, n))
        h[2000:2100] = l[2000:2100] = c[2000:2100]
        h[:1200] = l[:1200] = c[:1200]
        v = rng.integers(0, 5000, n)
        v[rng.random(n) < 0.05] = 0
        df = pd.DataFrame({"ticker": tk, "t": t, "o": o, "h": h, "l": l, "c": c, "v": v,
                           "n": rng.integers(0, 50, n), "vw": (h + l + c) / 3})
        ny = df["t"].dt.tz_convert("America/New_York")
        monday = (ny.dt.normalize() - pd.to_timedelta(ny.dt.day_of_week, unit="D")).dt.tz_localize(None)
        for mon, part in df.groupby(monday):
            iso = mon.isocalendar()
            d = os.path.join(root, "stock-data", tk, f"{mon.year:04d}", f"{mon.month:02d}")
            os.makedirs(d, exist_ok=True)
            pq.write_table(pa.Table.from_pandas(part, schema=schema, preserve_index=False),
                           os.path.join(d, f"{tk}_{iso[0]:04d}-W{iso[1]:02d}.parquet"))
        # a later delivery (sorts after every weekly key) correcting some bars
        fix = df.iloc[5000:5100].copy()
        fix["c"] = fix["c"] * 1.001
        fix["h"] = np.maximum(fix["h"], fix["c"])
        d = os.path.join(root, "stock-data", tk, "zz")
        os.makedirs(d, exist_ok=True)
        pq.write_table(pa.Table.from_pandas(fix, schema=schema, preserve_index=False),
                       os.path.join(d, f"{tk}_fix.parquet"))
    # macro: monthly TESTM, dated the first of the month, plus a duplicate date
    mdates = pd.date_range("2024-01-01", "2024-12-01", freq="MS").date
    mac = pa.table({"series": ["TESTM"] * len(mdates), "date": pa.array(mdates, pa.date32()),
                    "value": np.arange(len(mdates), dtype=float) + 0.5})
    d = os.path.join(root, "macro-data", "TESTM", "2024")
    os.makedirs(d, exist_ok=True)
    pq.write_table(mac, os.path.join(d, "TESTM_a.parquet"))
    pq.write_table(pa.table({"series": ["TESTM"], "date": pa.array([mdates[9]], pa.date32()),
                             "value": [99.25]}), os.path.join(d, "TESTM_b.parquet"))
    mdates2 = pd.date_range("2024-07-01", "2024-10-01", freq="QS").date  # NULL before 10-09
    d = os.path.join(root, "macro-data", "QQ")
    os.makedirs(d, exist_ok=True)
    pq.write_table(pa.table({"series": ["QQ"] * len(mdates2), "date": pa.array(mdates2, pa.date32()),
                             "value": np.arange(len(mdates2), dtype=float) * 10}),
                   os.path.join(d, "QQ.parquet"))
    # fundamentals: AAA dated rows (filings inside the window, an old year
    # filed late, a redelivered year with a metric missing), BBB an undated
    # row and one filed "before" its year ended, CCC none public yet, DDD no
    # directory
    D = lambda s: pd.Timestamp(s).date()
    fund_rows = {
        "CCC": [(2025, D("2024-10-31"), None, 3.0)],  # public 2025-01-29: none in the window
        "AAA": [
            (2021, D("2021-09-30"), D("2024-10-20"), 0.5),  # an old year filed late
            (2022, D("2022-09-30"), D("2022-11-01"), 1.0),
            (2023, D("2023-09-30"), D("2023-11-03"), 2.0),
            (2024, D("2024-09-28"), D("2024-11-01"), None),
        ],
        "BBB": [
            (2023, None, None, 5.0),          # public 2023-12-31 + 90
            (2024, D("2024-06-30"), D("2024-06-01"), 6.0),  # filed "before" its end: public 07-01
        ],
    }
    metrics = [m for m, _ in FUND_METRICS]
    for tk, rows in fund_rows.items():
        cols = {
            "symbol": [tk] * len(rows),
            "calendarYear": pa.array([r[0] for r in rows], pa.int32()),
            "date": pa.array([r[1] for r in rows], pa.date32()),
            "fillingDate": pa.array([r[2] for r in rows], pa.date32()),
        }
        for j, m in enumerate(metrics):
            cols[m] = pa.array([None if (r[3] is None and j == 2) else (r[0] * 10.0 + j + (r[3] or 0))
                                for r in rows], pa.float64())
        d = os.path.join(root, "company-fundamentals", tk)
        os.makedirs(d, exist_ok=True)
        pq.write_table(pa.table(cols), os.path.join(d, f"{tk}.parquet"))
    # AAA 2024 later delivery: a revised row for the same calendar year
    rows = [(2024, D("2024-09-28"), D("2024-11-15"), None)]
    cols = {"symbol": ["AAA"], "calendarYear": pa.array([2024], pa.int32()),
            "date": pa.array([rows[0][1]], pa.date32()), "fillingDate": pa.array([rows[0][2]], pa.date32())}
    for j, m in enumerate(metrics):
        cols[m] = pa.array([None if j == 2 else 7000.0 + j], pa.float64())
    pq.write_table(pa.table(cols), os.path.join(root, "company-fundamentals", "AAA", "AAA_z.parquet"))
    return list(specs)


def brute_expected(store, ticker, res, macro_lags, fund_lag):
    """The joined columns by brute force, reading the rules literally."""
    import datetime as dt
    import numpy as np
    import pyarrow.parquet as pq
    import zoneinfo

    ny = zoneinfo.ZoneInfo("America/New_York")
    dates = [t.astimezone(ny).date() for t in res["ts"].to_list()]
    exp = {}
    for series, lag in macro_lags.items():
        obs = {}
        for f in parquet_files(os.path.join(store, "macro-data", series)):
            tb = pq.read_table(f).to_pylist()
            for r in tb:
                obs[r["date"]] = r["value"]
        col = []
        for d in dates:
            best = None
            for od, val in obs.items():
                if od + dt.timedelta(days=lag) <= d and (best is None or od > best[0]):
                    best = (od, val)
            col.append(None if best is None else best[1])
        exp[f"macro_{series.lower()}"] = col
    years = {}
    for f in parquet_files(os.path.join(store, "company-fundamentals", ticker)):
        for r in pq.read_table(f).to_pylist():
            years[r["calendarYear"]] = r
    rows = []
    for r in years.values():
        pe = r["date"] or dt.date(r["calendarYear"], 12, 31)
        pub = r["fillingDate"] or pe + dt.timedelta(days=fund_lag)
        pub = max(pub, pe + dt.timedelta(days=1))
        rows.append((pe, pub, r))
    for m, cname in FUND_METRICS:
        col = []
        for d in dates:
            ok = [x for x in rows if x[1] <= d]
            if not ok:
                col.append(None)
                continue
            best = max(ok, key=lambda x: (x[0], x[1]))
            col.append(best[2][m])
        exp[cname] = col
    return exp


def talib_expected(res):
    import numpy as np
    import talib

    o = res["open"].to_numpy()
    h, l, c, v = (res[x].to_numpy().astype(float) for x in ("high", "low", "close", "volume"))
    lr = np.r_[np.nan, np.log(c[1:] / c[:-1])]
    macd, sig, hist = talib.MACD(c, 12, 26, 9)
    k, d = talib.STOCHF(h, l, c, 14, 3, 0)
    up, mid, lo = talib.BBANDS(c, 20, 2, 2, 0)
    return {
        "log_return": lr,
        "sma_20": talib.SMA(c, 20),
        "ema_12": talib.EMA(c, 12),
        "ema_26": talib.EMA(c, 26),
        "rsi_14": talib.RSI(c, 14),
        "macd": macd, "macd_signal": sig, "macd_hist": hist,
        "obv": talib.OBV(c, v),
        "stoch_k": k, "stoch_d": d,
        "bb_upper": up, "bb_middle": mid, "bb_lower": lo,
        "atr_14": talib.ATR(h, l, c, 14),
        "volatility_20": talib.STDDEV(lr, 20, 1),
    }


def pandas_resample(store, ticker, minutes):
    """The resampled OHLCV by an independent pandas path (exchange_calendars
    minute-by-minute), to check the session filter and buckets."""
    import numpy as np
    import pandas as pd
    import exchange_calendars as xc

    files = parquet_files(os.path.join(store, "stock-data", ticker))
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    df = df.sort_values("t", kind="stable").drop_duplicates("t", keep="last")
    cal = xc.get_calendar("XNYS", start="2000-01-01")
    sched = cal.schedule
    ny = df["t"].dt.tz_convert("America/New_York")
    rows = []
    for day, part in df.groupby(ny.dt.date):
        ts = pd.Timestamp(day)
        if ts not in sched.index:
            continue
        op, cl = sched.loc[ts, "open"], sched.loc[ts, "close"]
        part = part[(part["t"] >= op) & (part["t"] < cl)]
        if part.empty:
            continue
        if minutes is None:
            b = pd.Series(op, index=part.index)
        else:
            b = op + ((part["t"] - op) // pd.Timedelta(minutes=minutes)) * pd.Timedelta(minutes=minutes)
        for bt, g in part.groupby(b, sort=True):
            rows.append((bt, g["o"].iloc[0], g["h"].max(), g["l"].min(), g["c"].iloc[-1], float(g["v"].sum())))
    return pd.DataFrame(rows, columns=["ts", "open", "high", "low", "close", "volume"])


def cmd_selftest(a):
    import numpy as np
    import polars as pl

    store = os.path.join(a.dir, "store")
    tickers = make_store(store)
    macro_lags = {"TESTM": 35, "QQ": 100}
    fund_lag = 90
    worst = {}
    failures = []
    for interval in ["1m", "5m", "15m", "30m", "1h", "1d"]:
        res, line = run_compute(store, tickers, interval, parse_macro(",".join(f"{k}={v}" for k, v in macro_lags.items())),
                                fund_lag, out=os.path.join(a.dir, "out", interval), quiet=True)
        print(json.dumps({"interval": interval, **line}))
        for tk, r in res.items():
            if r.columns != ["ts"] + BASE + ["macro_qq", "macro_testm"] + FUND_COLUMNS:
                failures.append(f"{interval} {tk}: columns {r.columns}")
            # resample against an independent pandas path
            if interval in ("1h", "1d", "30m"):
                ref = pandas_resample(store, tk, INTERVALS[interval])
                got = r.select("ts", "open", "high", "low", "close", "volume").to_pandas()
                if len(ref) != len(got) or (ref["ts"].values != got["ts"].values).any() or \
                        not np.allclose(ref[["open", "high", "low", "close", "volume"]].values,
                                        got[["open", "high", "low", "close", "volume"]].values, rtol=0, atol=0):
                    failures.append(f"{interval} {tk}: resample differs from the pandas path")
            exp = talib_expected(r)
            for col, e in exp.items():
                g = r[col].to_numpy()
                gn, en = np.isnan(g), np.isnan(e)
                if (gn != en).any():
                    i = int(np.nonzero(gn != en)[0][0])
                    failures.append(f"{interval} {tk} {col}: NULL differs at {i}: ours {g[i]} talib {e[i]}")
                    continue
                m = ~gn
                rel = np.abs(g[m] - e[m]) / np.maximum(1.0, np.maximum(np.abs(g[m]), np.abs(e[m])))
                mx = float(rel.max()) if rel.size else 0.0
                worst[col] = max(worst.get(col, 0.0), mx)
                if mx > 1e-9:
                    i = int(np.argmax(rel))
                    failures.append(f"{interval} {tk} {col}: rel {mx:.3e}")
            if interval in ("1h", "1d", "5m"):
                bexp = brute_expected(store, tk, r, macro_lags, fund_lag)
                for col, e in bexp.items():
                    if r[col].to_list() != e:
                        gl = r[col].to_list()
                        i = next(i for i in range(len(e)) if gl[i] != e[i])
                        failures.append(f"{interval} {tk} {col}: join differs at {r['ts'][i]}: ours {gl[i]} brute {e[i]}")
        # the 1h grid and the half day
        if interval == "1h":
            r = res["AAA"]
            hd = r.filter(pl.col("ts").dt.convert_time_zone("America/New_York").dt.date() == pl.date(2024, 11, 29))
            labels = hd["ts"].dt.convert_time_zone("America/New_York").dt.strftime("%H:%M").to_list()
            if labels != ["09:30", "10:30", "11:30", "12:30"]:
                failures.append(f"1h half day labels {labels}")
            full = r.filter(pl.col("ts").dt.convert_time_zone("America/New_York").dt.date() == pl.date(2024, 11, 27))
            labels = full["ts"].dt.convert_time_zone("America/New_York").dt.strftime("%H:%M").to_list()
            if labels != ["09:30", "10:30", "11:30", "12:30", "13:30", "14:30", "15:30"]:
                failures.append(f"1h full day labels {labels}")
            if r.filter(pl.col("ts").dt.convert_time_zone("America/New_York").dt.date() == pl.date(2024, 11, 28)).height:
                failures.append("bars on Thanksgiving")
    # check subcommand on itself and on a perturbed copy
    e, _ = compare_frames(res["AAA"], res["AAA"], "AAA")
    if e:
        failures.append(f"check self: {e}")
    bad = res["AAA"].with_columns(
        pl.when(pl.int_range(pl.len()) == 40).then(pl.col("rsi_14") * (1 + 1e-8)).otherwise(pl.col("rsi_14")).alias("rsi_14"))
    e, _ = compare_frames(res["AAA"], bad, "AAA")
    if not e:
        failures.append("check did not catch a perturbation")
    print(json.dumps({"max_rel_vs_talib": worst}))
    for f in failures:
        print("FAIL", f)
    print("selftest", "FAILED" if failures else "passed")
    sys.exit(1 if failures else 0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compute")
    c.add_argument("--store", required=True)
    c.add_argument("--tickers", required=True)
    c.add_argument("--interval", required=True, choices=list(INTERVALS))
    c.add_argument("--macro", default="")
    c.add_argument("--fund-lag", type=int, default=90)
    c.add_argument("--out")
    c.set_defaults(fn=cmd_compute)
    k = sub.add_parser("check")
    k.add_argument("--ours", required=True)
    k.add_argument("--peer", required=True)
    k.set_defaults(fn=cmd_check)
    e = sub.add_parser("e2e")
    e.add_argument("--s3-endpoint", required=True)
    e.add_argument("--bucket-prefix", default="")
    e.add_argument("--access-key", required=True)
    e.add_argument("--secret-key", required=True)
    e.add_argument("--pg-dsn", required=True)
    e.add_argument("--tickers", required=True)
    e.add_argument("--interval", default="5m", choices=list(INTERVALS))
    e.add_argument("--table", required=True)
    e.set_defaults(fn=cmd_e2e)
    s = sub.add_parser("selftest")
    s.add_argument("--dir", default="/tmp/aggpeer")
    s.set_defaults(fn=cmd_selftest)
    a = p.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
