//! Every indicator column against TA-Lib (`scripts/py/talib_reference.py`,
//! the `ta-lib` package that scripts/setup.sh installs into the test venv),
//! on the real daily OHLCV of `data/sample/stocks_daily.csv` (AAPL, GOOG,
//! IBM, MSFT; bokeh-sampledata) and on an edge-case series: NULL exactly
//! where TA-Lib has no value, and equal to 1e-9 relative everywhere after
//! warm-up.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use tickmesh_features::{FeatureConfig, IndicatorState, Ohlcv};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The Python of the test venv (scripts/env.sh puts it first on PATH).
fn python() -> String {
    let py = std::env::var("TICKMESH_PYTHON").unwrap_or_else(|_| "python".into());
    let ok = Command::new(&py)
        .args(["-c", "import talib, numpy"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "`{py}` cannot import talib: run scripts/setup.sh and `. scripts/env.sh` (scripts/test.sh does both)"
    );
    py
}

fn run_reference(args: &[String]) -> serde_json::Value {
    let out = Command::new(python())
        .arg(repo().join("scripts/py/talib_reference.py"))
        .args(args)
        .output()
        .expect("run talib_reference.py");
    assert!(
        out.status.success(),
        "talib_reference.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("talib_reference.py prints JSON")
}

/// A CSV's bars per ticker, in file order.
fn read_csv(path: &std::path::Path) -> BTreeMap<String, Vec<Ohlcv>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut by: BTreeMap<String, Vec<Ohlcv>> = BTreeMap::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let num = |i: usize| f[i].parse::<f64>().unwrap();
        by.entry(f[0].to_string()).or_default().push(Ohlcv {
            o: num(2),
            h: num(3),
            l: num(4),
            c: num(5),
            v: num(6),
        });
    }
    by
}

fn sample() -> PathBuf {
    repo().join("data/sample/stocks_daily.csv")
}

/// Compares every column of every ticker of the CSV at `path`; returns the
/// largest relative difference seen.
fn compare(cfg: &FeatureConfig, path: &std::path::Path, at_least: usize) -> f64 {
    let bars = read_csv(path);
    let reference = run_reference(&[
        path.display().to_string(),
        serde_json::to_string(cfg).unwrap(),
    ]);
    let columns = cfg.columns();
    let mut worst: f64 = 0.0;
    let mut compared = 0usize;
    for (ticker, series) in &bars {
        let mut st = IndicatorState::new(cfg);
        let rows: Vec<_> = series.iter().map(|b| st.step(*b)).collect();
        for (j, name) in columns.iter().enumerate() {
            let want = reference[ticker][name]
                .as_array()
                .unwrap_or_else(|| panic!("TA-Lib has no column {name}"));
            assert_eq!(want.len(), rows.len(), "{ticker} {name}");
            for (i, w) in want.iter().enumerate() {
                match (rows[i][j], w.as_f64()) {
                    (None, None) => {}
                    (Some(a), Some(b)) => {
                        let diff = (a - b).abs();
                        let rel = diff / b.abs().max(f64::MIN_POSITIVE);
                        // A value within rounding of 0 (a histogram or a log
                        // return crossing zero) has no meaningful relative
                        // difference: there the absolute one must be tiny.
                        assert!(
                            rel <= 1e-9 || diff <= 1e-12,
                            "{ticker} {name} at bar {i}: ours {a}, TA-Lib {b} (relative {rel:e})"
                        );
                        if b.abs() > 1e-6 {
                            worst = worst.max(rel);
                        }
                        compared += 1;
                    }
                    (a, b) => panic!(
                        "{ticker} {name} at bar {i}: ours {a:?}, TA-Lib {b:?} (warm-up differs)"
                    ),
                }
            }
        }
    }
    assert!(compared >= at_least, "compared only {compared} values");
    eprintln!("{compared} values equal TA-Lib's; largest relative difference {worst:e}");
    worst
}

#[test]
fn every_column_equals_talib_at_the_default_periods() {
    let cfg = FeatureConfig::default();
    assert_eq!(
        cfg.columns().join(","),
        "open,high,low,close,volume,log_return,sma_20,ema_12,ema_26,rsi_14,macd,macd_signal,\
         macd_hist,obv,stoch_k,stoch_d,bb_upper,bb_middle,bb_lower,atr_14,volatility_20"
    );
    compare(&cfg, &sample(), 200_000);
}

#[test]
fn every_column_equals_talib_at_other_periods() {
    compare(
        &FeatureConfig {
            sma: 50,
            ema: vec![5, 9, 200],
            rsi: 7,
            macd: [5, 35, 5],
            stoch: [5, 5],
            bollinger: 10,
            bollinger_k: 1.5,
            atr: 21,
            volatility: 60,
        },
        &sample(),
        200_000,
    );
}

/// The branches where indicators special-case, against TA-Lib: flat
/// stretches (RSI's 0, a zero Bollinger width and volatility, zero %K
/// ranges), bars with zero range, zero volumes, and changes of 1e-7 (quiet
/// enough that a 1e-8 zero test, as in older TA-Lib builds, would floor them).
#[test]
fn edge_cases_equal_talib() {
    let dir = std::env::temp_dir().join(format!("tickmesh-talib-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("edge.csv");
    let mut csv = String::from("Ticker,Date,Open,High,Low,Close,Volume\n");
    let mut c = 50.0f64;
    for i in 0..400u64 {
        let (o, h, l);
        let phase = (i / 40) % 4;
        match phase {
            // Flat: every price equal.
            0 => (o, h, l) = (c, c, c),
            // Tiny steps up and down.
            1 => {
                o = c;
                c += if i % 3 == 0 { -1e-7 } else { 1e-7 };
                (h, l) = (o.max(c), o.min(c));
            }
            // Ordinary moves.
            _ => {
                o = c;
                c *= 1.0 + 0.01 * (((i * 7919) % 17) as f64 / 8.0 - 1.0);
                (h, l) = (o.max(c) + 0.05, o.min(c) - 0.05);
            }
        }
        let v = if i % 7 == 0 { 0 } else { 1000 + i };
        csv.push_str(&format!("EDGE,2024-01-01,{o:?},{h:?},{l:?},{c:?},{v}\n"));
    }
    std::fs::write(&path, csv).unwrap();
    compare(&FeatureConfig::default(), &path, 5_000);
    compare(
        &FeatureConfig {
            sma: 2,
            ema: vec![2, 3],
            rsi: 2,
            macd: [2, 3, 1],
            stoch: [1, 1],
            bollinger: 2,
            bollinger_k: 3.0,
            atr: 1,
            volatility: 2,
        },
        &path,
        5_000,
    );
    std::fs::remove_dir_all(&dir).ok();
}
