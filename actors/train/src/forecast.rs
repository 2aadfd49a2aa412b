//! Recursive multi-step forecasts: predict the next log return, turn it into
//! the next close, append it as a
//! bar, recompute the features with the same code the aggregator uses, and
//! repeat for `n_steps`. Timestamps follow the trading calendar.

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use tch::{nn, Device, Tensor};
use tickmesh_aggregate::features::{column_index, feature_rows};
use tickmesh_core::calendar;
use tickmesh_core::types::{Bar, Interval};
use tickmesh_core::{Error, Result};

use crate::checkpoint::{load_model, Meta};
use crate::dataset::{encode_window, encoding_of, target_column, Encoding, TARGET};
use crate::model::LstmAttention;

/// How many bars of history a forecast needs beyond `seq_len`, so every
/// indicator has warmed up (MACD signal: 26 + 9).
pub const WARMUP_BARS: usize = 60;

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

/// A loaded model, ready to forecast.
pub struct Forecaster {
    pub meta: Meta,
    model: LstmAttention,
    _vs: nn::VarStore,
    columns: Vec<usize>,
    encodings: Vec<Encoding>,
    target: usize,
    device: Device,
}

impl Forecaster {
    pub fn load(meta: Meta, weights: &[u8], device: Device) -> Result<Self> {
        let columns = meta
            .features
            .iter()
            .map(|f| {
                column_index(f)
                    .ok_or_else(|| Error::invalid("checkpoint", format!("unknown feature `{f}`")))
            })
            .collect::<Result<Vec<_>>>()?;
        if meta.target != TARGET {
            return Err(Error::invalid(
                "checkpoint",
                format!("unknown target `{}`", meta.target),
            ));
        }
        let target = target_column(&meta.features)
            .ok_or_else(|| Error::invalid("checkpoint", "features lack close"))?;
        let encodings = meta.features.iter().map(|f| encoding_of(f)).collect();
        let (vs, model) = load_model(&meta, weights, device)?;
        Ok(Forecaster {
            meta,
            model,
            _vs: vs,
            columns,
            encodings,
            target,
            device,
        })
    }

    /// Forecasts `n_steps` closes after the time-sorted `history` bars.
    pub fn forecast(&self, history: &[Bar], n_steps: usize) -> Result<Vec<ForecastPoint>> {
        let seq = self.meta.seq_len;
        let mut bars: Vec<Bar> = history.to_vec();
        let mut out = Vec::with_capacity(n_steps);
        for _ in 0..n_steps {
            let start = bars.len().saturating_sub(seq + WARMUP_BARS);
            let rows = feature_rows(&bars[start..]);
            if rows.len() < seq {
                return Err(Error::invalid(
                    "forecast",
                    format!("{} bars of history, the model needs {seq}", rows.len()),
                ));
            }
            let mut window = Vec::with_capacity(seq);
            for r in &rows[rows.len() - seq..] {
                let row = self
                    .columns
                    .iter()
                    .enumerate()
                    .map(|(j, &c)| {
                        r.values[c].ok_or_else(|| {
                            Error::invalid(
                                "forecast",
                                format!(
                                    "feature `{}` is undefined at {} (not enough history)",
                                    self.meta.features[j], r.ts
                                ),
                            )
                        })
                    })
                    .collect::<Result<Vec<f64>>>()?;
                window.push(row);
            }
            let mut x = Vec::with_capacity(seq * self.columns.len());
            encode_window(
                &window,
                &self.encodings,
                self.target,
                &self.meta.scaler,
                &mut x,
            );
            let xt = Tensor::from_slice(&x)
                .reshape([1, seq as i64, self.columns.len() as i64])
                .to_device(self.device);
            let z = tch::no_grad(|| self.model.forward(&xt)).double_value(&[0]);
            let last = *bars.last().expect("history is not empty");
            let close = self.meta.target_scale.close_after(last.c, z);
            let t = next_timestamp(last.t, self.meta.interval);
            bars.push(Bar {
                t,
                o: last.c,
                h: last.c.max(close),
                l: last.c.min(close),
                c: close,
                v: last.v,
                n: 0,
                vw: close,
            });
            out.push(ForecastPoint { ts: t, close });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_timestamps_follow_the_calendar() {
        let t: DateTime<Utc> = "2024-07-03T13:30:00Z".parse().unwrap(); // Wed 09:30 EDT
                                                                        // July 4th is closed: the next daily bar opens on Friday the 5th.
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
