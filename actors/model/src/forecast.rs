//! Recursive multi-step forecasts whose inputs equal the training inputs.
//!
//! A [`History`] is built from the stored `aggregated_data` rows of a
//! ticker-interval (every column): it folds the indicator state over all of
//! them, so it holds the state at the last stored bar, and keeps the last
//! stored rows for the first input window. Each forecast step predicts the
//! next log return, turns it into the next close, appends that as a bar
//! (open = previous close, high/low = the two closes, volume = the previous
//! volume) and advances the same state by it, never recomputing indicators
//! over a truncated history. Timestamps follow the trading calendar.
//!
//! The forward pass is [`crate::native`]'s, in plain Rust on the CPU: one
//! window at a time, libtorch's per-operator dispatch would cost more than
//! the arithmetic (BENCHMARKS.md, serving).

use std::collections::VecDeque;

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use tch::Device;
use tickmesh_core::calendar;
use tickmesh_core::types::AggRow;
use tickmesh_core::types::Interval;
use tickmesh_core::{Error, Result};
use tickmesh_features::{column_index, FeatureConfig, IndicatorState, Ohlcv};

use crate::checkpoint::{load_model, Meta};
use crate::dataset::Encoder;
use crate::native::{NativeModel, Scratch};

/// One forecast point.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ForecastPoint {
    pub ts: DateTime<Utc>,
    pub close: f64,
}

/// The timestamp of the bar after `t` on `interval`.
pub fn next_timestamp(t: DateTime<Utc>, interval: Interval) -> DateTime<Utc> {
    let next_open = |after: chrono::NaiveDate| {
        let mut d = after.succ_opt().expect("date in range");
        loop {
            if let Some((open, _)) = calendar::session(d) {
                return open;
            }
            d = d.succ_opt().expect("date in range");
        }
    };
    let date = calendar::ny_date(t);
    match interval.minutes() {
        None => next_open(date),
        Some(m) => {
            let n = t + Duration::minutes(m);
            match calendar::session(date) {
                Some((_, close)) if n < close => n,
                _ => next_open(date),
            }
        }
    }
}

/// The indicator state at the last bar, and the last rows (every column).
#[derive(Debug, Clone, PartialEq)]
pub struct History {
    state: IndicatorState,
    rows: VecDeque<(DateTime<Utc>, Vec<Option<f64>>)>,
    keep: usize,
    last: Option<(DateTime<Utc>, Ohlcv)>,
}

impl History {
    /// An empty history of the indicators of `indicators`, keeping the last `keep` rows.
    pub fn new(indicators: &FeatureConfig, keep: usize) -> Self {
        History {
            state: IndicatorState::new(indicators),
            rows: VecDeque::with_capacity(keep + 1),
            keep,
            last: None,
        }
    }

    /// The columns a stored row carries, in order.
    pub fn columns(&self) -> Vec<String> {
        self.state.config().columns()
    }

    /// Appends a stored row (all of [`History::columns`] in order): the
    /// state advances by its OHLCV, the row is kept as stored.
    pub fn push_stored(&mut self, row: &AggRow) -> Result<()> {
        let bar = Ohlcv::of_row(&row.values).ok_or_else(|| {
            Error::invalid(
                "forecast history",
                format!(
                    "the row at {} lacks open, high, low, close or volume",
                    row.ts
                ),
            )
        })?;
        if row.values.len() != self.state.width() {
            return Err(Error::invalid(
                "forecast history",
                format!(
                    "rows need all {} feature columns, got {}",
                    self.state.width(),
                    row.values.len()
                ),
            ));
        }
        if self.last.is_some_and(|(t, _)| row.ts <= t) {
            return Err(Error::invalid(
                "forecast history",
                format!("rows out of order at {}", row.ts),
            ));
        }
        self.state.step(bar);
        self.keep_row(row.ts, row.values.clone(), bar);
        Ok(())
    }

    /// Appends a new bar: the state computes its row.
    pub fn push_bar(&mut self, ts: DateTime<Utc>, bar: Ohlcv) {
        let values = self.state.step(bar);
        self.keep_row(ts, values, bar);
    }

    fn keep_row(&mut self, ts: DateTime<Utc>, values: Vec<Option<f64>>, bar: Ohlcv) {
        self.rows.push_back((ts, values));
        while self.rows.len() > self.keep {
            self.rows.pop_front();
        }
        self.last = Some((ts, bar));
    }

    /// True when `other` keeps as many rows of the same indicators.
    pub fn same_shape(&self, other: &History) -> bool {
        self.keep == other.keep && self.state.config() == other.state.config()
    }

    /// How many rows it keeps.
    pub fn keep(&self) -> usize {
        self.keep
    }

    /// The last bar's time and OHLCV.
    pub fn last(&self) -> Option<(DateTime<Utc>, Ohlcv)> {
        self.last
    }

    /// How many bars the state has seen.
    pub fn bars(&self) -> u64 {
        self.state.bars()
    }

    /// The last row kept (every column).
    pub fn last_row(&self) -> Option<&[Option<f64>]> {
        self.rows.back().map(|(_, r)| r.as_slice())
    }
}

/// A loaded model, ready to forecast. Immutable once loaded: any number of
/// threads may forecast with it at once.
pub struct Forecaster {
    pub meta: Meta,
    model: NativeModel,
    columns: Vec<usize>,
    encoder: Encoder,
}

impl Forecaster {
    /// Checks `meta`, loads `weights` into the model it describes (strictly:
    /// every parameter present, of its shape) and keeps them for the native
    /// forward pass.
    pub fn load(meta: Meta, weights: &[u8]) -> Result<Self> {
        let encoder = meta.encoder()?;
        let all = meta.indicators.columns();
        let columns = meta
            .features
            .iter()
            .map(|f| column_index(&all, f).expect("checked by Meta::encoder"))
            .collect();
        let (vs, _) = load_model(&meta, weights, Device::Cpu)?;
        let model = NativeModel::from_vars(&meta.arch(), &vs.variables())?;
        Ok(Forecaster {
            meta,
            model,
            columns,
            encoder,
        })
    }

    /// A history sized for this model.
    pub fn history(&self) -> History {
        History::new(&self.meta.indicators, self.meta.seq_len)
    }

    /// A history of the stored rows (all columns, oldest first).
    pub fn history_of(&self, rows: &[AggRow]) -> Result<History> {
        let mut h = self.history();
        for r in rows {
            h.push_stored(r)?;
        }
        Ok(h)
    }

    /// The encoded input window at the end of `h`, `[seq_len * features]`.
    pub fn window(&self, h: &History) -> Result<Vec<f32>> {
        let seq = self.meta.seq_len;
        if h.rows.len() < seq {
            return Err(Error::invalid(
                "forecast",
                format!("{} bars of history, the model needs {seq}", h.rows.len()),
            ));
        }
        let mut window = Vec::with_capacity(seq);
        for (ts, r) in h.rows.iter().skip(h.rows.len() - seq) {
            let row = self
                .columns
                .iter()
                .enumerate()
                .map(|(j, &c)| {
                    r[c].filter(|v| v.is_finite()).ok_or_else(|| {
                        Error::invalid(
                            "forecast",
                            format!(
                                "feature `{}` is undefined at {ts} (not enough history)",
                                self.meta.features[j]
                            ),
                        )
                    })
                })
                .collect::<Result<Vec<f64>>>()?;
            window.push(row);
        }
        let mut x = Vec::with_capacity(seq * self.columns.len());
        self.encoder.encode_window(&window, &mut x);
        Ok(x)
    }

    /// The model's output for the input window at the end of `h`.
    pub fn predict(&self, h: &History) -> Result<f32> {
        Ok(self
            .model
            .forward(&self.window(h)?, &mut Scratch::default()))
    }

    /// The close the model predicts for the bar after the end of `h`.
    pub fn next_close(&self, h: &History, scratch: &mut Scratch) -> Result<f64> {
        let z = self.model.forward(&self.window(h)?, scratch) as f64;
        let (_, last) = h.last().expect("a window implies a last bar");
        Ok(self.encoder.target_scale.close_after(last.c, z))
    }

    /// Forecasts `n_steps` closes after the end of `h` (which is left as it is).
    pub fn forecast(&self, h: &History, n_steps: usize) -> Result<Vec<ForecastPoint>> {
        let mut h = h.clone();
        let mut scratch = Scratch::default();
        (0..n_steps)
            .map(|_| self.step(&mut h, &mut scratch))
            .collect()
    }

    /// One step of the recursion: predicts the bar after the end of `h`
    /// and appends it to `h`.
    pub fn step(&self, h: &mut History, scratch: &mut Scratch) -> Result<ForecastPoint> {
        let x = self.window(h)?;
        let z = self.model.forward(&x, scratch) as f64;
        let (t, last) = h.last().expect("a window implies a last bar");
        let close = self.encoder.target_scale.close_after(last.c, z);
        if !close.is_finite() {
            return Err(Error::invalid(
                "forecast",
                format!("the model predicted a non-finite close after {t}"),
            ));
        }
        let ts = next_timestamp(t, self.meta.interval);
        h.push_bar(
            ts,
            Ohlcv {
                o: last.c,
                h: last.c.max(close),
                l: last.c.min(close),
                c: close,
                v: last.v,
            },
        );
        Ok(ForecastPoint { ts, close })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_timestamps_follow_the_calendar() {
        // Wed 2024-07-03 09:30 EDT; July 4th is closed: the next daily bar opens on Friday the 5th.
        let t: DateTime<Utc> = "2024-07-03T13:30:00Z".parse().unwrap();
        assert_eq!(
            next_timestamp(t, Interval::D1).to_rfc3339(),
            "2024-07-05T13:30:00+00:00"
        );
        let t: DateTime<Utc> = "2024-07-02T19:59:00Z".parse().unwrap(); // 15:59 EDT
        assert_eq!(
            next_timestamp(t, Interval::M1).to_rfc3339(),
            "2024-07-03T13:30:00+00:00"
        );
        let t: DateTime<Utc> = "2024-07-02T14:00:00Z".parse().unwrap();
        assert_eq!(
            next_timestamp(t, Interval::M5).to_rfc3339(),
            "2024-07-02T14:05:00+00:00"
        );
    }
}
