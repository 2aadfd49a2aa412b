//! tickmesh-features: the technical indicators as one incremental state.
//!
//! [`IndicatorState`] advances one bar at a time and yields that bar's row of
//! every [`FEATURE_COLUMNS`] entry. The batch computation, [`feature_rows`],
//! is a fold of the same step, so the aggregator (which loads
//! `aggregated_data`) and the forecaster (which advances the state through
//! predicted bars from the state at the last stored bar) compute features
//! with the same arithmetic, bit for bit, whatever history they start from.
//!
//! Columns: open, high, low, close, volume, log return, SMA-20, EMA-12,
//! EMA-26, MACD (EMA-12 − EMA-26) and its 9-period signal, RSI-14 (Wilder),
//! OBV (from 0). `None` while an indicator warms up.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use tickmesh_core::config::FEATURE_COLUMNS;
use tickmesh_core::types::AggRow;
use tickmesh_core::types::Bar;

#[cfg(test)]
mod reference;

/// The number of feature columns, [`FEATURE_COLUMNS`]`.len()`.
pub const N_COLUMNS: usize = 13;

/// One bar's feature values, in [`FEATURE_COLUMNS`] order.
pub type FeatureRow = [Option<f64>; N_COLUMNS];

/// The OHLCV of one bar, as the indicators read it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Ohlcv {
    pub o: f64,
    pub h: f64,
    pub l: f64,
    pub c: f64,
    pub v: f64,
}

impl From<&Bar> for Ohlcv {
    fn from(b: &Bar) -> Self {
        Ohlcv {
            o: b.o,
            h: b.h,
            l: b.l,
            c: b.c,
            v: b.v as f64,
        }
    }
}

impl Ohlcv {
    /// The OHLCV of a stored `aggregated_data` row (all columns, in order);
    /// `None` when one of them is missing.
    pub fn of_row(values: &[Option<f64>]) -> Option<Self> {
        Some(Ohlcv {
            o: values.first().copied().flatten()?,
            h: values.get(1).copied().flatten()?,
            l: values.get(2).copied().flatten()?,
            c: values.get(3).copied().flatten()?,
            v: values.get(4).copied().flatten()?,
        })
    }
}

/// Simple moving average over the last `n` points (running sum).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Sma {
    n: usize,
    window: VecDeque<f64>,
    sum: f64,
}

impl Sma {
    fn new(n: usize) -> Self {
        Sma {
            n,
            window: VecDeque::with_capacity(n + 1),
            sum: 0.0,
        }
    }

    fn step(&mut self, x: f64) -> Option<f64> {
        if self.window.len() < self.n {
            self.sum += x;
        } else {
            let old = self.window.pop_front().expect("a full window");
            self.sum += x - old;
        }
        self.window.push_back(x);
        (self.window.len() == self.n).then(|| self.sum / self.n as f64)
    }
}

/// Exponential moving average with span `n` (alpha = 2 / (n + 1)), seeded
/// with the mean of its first `n` points.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Ema {
    n: usize,
    seen: usize,
    seed_sum: f64,
    value: Option<f64>,
}

impl Ema {
    fn new(n: usize) -> Self {
        Ema {
            n,
            seen: 0,
            seed_sum: 0.0,
            value: None,
        }
    }

    fn step(&mut self, x: f64) -> Option<f64> {
        match self.value.as_mut() {
            Some(e) => *e += 2.0 / (self.n as f64 + 1.0) * (x - *e),
            None => {
                self.seed_sum += x;
                self.seen += 1;
                if self.seen == self.n {
                    self.value = Some(self.seed_sum / self.n as f64);
                }
            }
        }
        self.value
    }
}

/// Relative strength index over `n` changes, Wilder's smoothing seeded with
/// the mean gain and loss of the first `n` changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Rsi {
    n: usize,
    changes: usize,
    gain: f64,
    loss: f64,
}

impl Rsi {
    fn new(n: usize) -> Self {
        Rsi {
            n,
            changes: 0,
            gain: 0.0,
            loss: 0.0,
        }
    }

    fn value(&self) -> f64 {
        if self.loss == 0.0 {
            100.0
        } else {
            100.0 - 100.0 / (1.0 + self.gain / self.loss)
        }
    }

    /// Takes the change from the previous close.
    fn step(&mut self, change: f64) -> Option<f64> {
        let n = self.n as f64;
        self.changes += 1;
        if self.changes <= self.n {
            if change > 0.0 {
                self.gain += change;
            } else {
                self.loss -= change;
            }
            if self.changes < self.n {
                return None;
            }
            self.gain /= n;
            self.loss /= n;
        } else {
            self.gain = (self.gain * (n - 1.0) + change.max(0.0)) / n;
            self.loss = (self.loss * (n - 1.0) + (-change).max(0.0)) / n;
        }
        Some(self.value())
    }
}

/// Every indicator's state after the bars it has seen. Serializable, so it
/// can be stored beside the rows it produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndicatorState {
    prev_close: Option<f64>,
    sma_20: Sma,
    ema_12: Ema,
    ema_26: Ema,
    macd_signal: Ema,
    rsi_14: Rsi,
    obv: f64,
    bars: u64,
}

impl Default for IndicatorState {
    fn default() -> Self {
        Self::new()
    }
}

impl IndicatorState {
    /// The state before any bar.
    pub fn new() -> Self {
        IndicatorState {
            prev_close: None,
            sma_20: Sma::new(20),
            ema_12: Ema::new(12),
            ema_26: Ema::new(26),
            macd_signal: Ema::new(9),
            rsi_14: Rsi::new(14),
            obv: 0.0,
            bars: 0,
        }
    }

    /// How many bars the state has seen.
    pub fn bars(&self) -> u64 {
        self.bars
    }

    /// Advances the state by one bar and returns that bar's feature row.
    pub fn step(&mut self, bar: Ohlcv) -> FeatureRow {
        let c = bar.c;
        let prev = self.prev_close.replace(c);
        let log_return = prev.map(|p| (c / p).ln());
        if let Some(p) = prev {
            if c > p {
                self.obv += bar.v;
            } else if c < p {
                self.obv -= bar.v;
            }
        }
        let rsi = prev.and_then(|p| self.rsi_14.step(c - p));
        let sma = self.sma_20.step(c);
        let fast = self.ema_12.step(c);
        let slow = self.ema_26.step(c);
        let macd = fast.zip(slow).map(|(f, s)| f - s);
        let signal = macd.and_then(|m| self.macd_signal.step(m));
        self.bars += 1;
        [
            Some(bar.o),
            Some(bar.h),
            Some(bar.l),
            Some(c),
            Some(bar.v),
            log_return,
            sma,
            fast,
            slow,
            macd,
            signal,
            rsi,
            Some(self.obv),
        ]
    }
}

/// The feature rows of time-sorted bars: a fold of [`IndicatorState::step`].
pub fn feature_rows(bars: &[Bar]) -> Vec<AggRow> {
    let mut st = IndicatorState::new();
    bars.iter()
        .map(|b| AggRow {
            ts: b.t,
            values: st.step(Ohlcv::from(b)).to_vec(),
        })
        .collect()
}

/// The index of a feature column in [`FEATURE_COLUMNS`].
pub fn column_index(name: &str) -> Option<usize> {
    FEATURE_COLUMNS.iter().position(|c| *c == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tickmesh_core::synthetic::SyntheticMarket;

    #[test]
    fn columns_match_the_feature_list() {
        assert_eq!(N_COLUMNS, FEATURE_COLUMNS.len());
    }

    /// The fold equals the whole-series formulas bit for bit, column by column.
    #[test]
    fn fold_equals_the_series_formulas() {
        let d = |s: &str| s.parse().unwrap();
        let mut bars = SyntheticMarket.bars("FOLD", d("2024-03-04"), d("2024-03-15"));
        // Flat stretches exercise the zero-change branches of RSI and OBV.
        for i in 100..140 {
            bars[i].c = bars[99].c;
        }
        let close: Vec<f64> = bars.iter().map(|b| b.c).collect();
        let volume: Vec<f64> = bars.iter().map(|b| b.v as f64).collect();
        let (macd, signal) = reference::macd(&close);
        let expected: Vec<Vec<Option<f64>>> = vec![
            bars.iter().map(|b| Some(b.o)).collect(),
            bars.iter().map(|b| Some(b.h)).collect(),
            bars.iter().map(|b| Some(b.l)).collect(),
            close.iter().map(|c| Some(*c)).collect(),
            volume.iter().map(|v| Some(*v)).collect(),
            reference::log_return(&close),
            reference::sma(&close, 20),
            reference::ema(&close, 12),
            reference::ema(&close, 26),
            macd,
            signal,
            reference::rsi(&close, 14),
            reference::obv(&close, &volume),
        ];
        let rows = feature_rows(&bars);
        for (j, col) in expected.iter().enumerate() {
            for (i, want) in col.iter().enumerate() {
                let got = rows[i].values[j];
                assert_eq!(
                    got.map(f64::to_bits),
                    want.map(f64::to_bits),
                    "{} at bar {i}",
                    FEATURE_COLUMNS[j]
                );
            }
        }
    }

    /// Splitting the history anywhere and resuming from the saved state
    /// (through a serde round trip) gives the same rows as one pass.
    #[test]
    fn resuming_from_a_saved_state_equals_one_pass() {
        let d = |s: &str| s.parse().unwrap();
        let bars = SyntheticMarket.bars("RESUME", d("2024-05-06"), d("2024-05-08"));
        let whole = feature_rows(&bars);
        for cut in [1, 13, 26, 35, 200, bars.len() - 1] {
            let mut st = IndicatorState::new();
            for b in &bars[..cut] {
                st.step(Ohlcv::from(b));
            }
            let json = serde_json::to_string(&st).unwrap();
            let mut st: IndicatorState = serde_json::from_str(&json).unwrap();
            for (i, b) in bars.iter().enumerate().skip(cut) {
                assert_eq!(
                    st.step(Ohlcv::from(b)).to_vec(),
                    whole[i].values,
                    "cut {cut}, bar {i}"
                );
            }
            assert_eq!(st.bars(), bars.len() as u64);
        }
    }
}
