//! Training windows and the min-max scaler.
//!
//! Rows with a missing feature (indicator warm-up) are dropped first. Samples
//! are `seq_len` consecutive rows; the target is the log return from the
//! window's last close to the next close, standardized. Predicting the
//! return (not the price level) keeps the model inside the range it was
//! trained on when prices trend, and makes "no change" the easy default.
//! The split is chronological: the last `val_fraction` of samples validate.
//! The scaler is fitted on the rows the training samples see, never on
//! validation rows.

use serde::{Deserialize, Serialize};
use tickmesh_core::db::AggRow;
use tickmesh_core::{Error, Result};

/// Min-max scaling per feature to [0, 1].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MinMaxScaler {
    pub min: Vec<f64>,
    pub max: Vec<f64>,
}

impl MinMaxScaler {
    pub fn fit(rows: &[Vec<f64>]) -> Self {
        let f = rows.first().map_or(0, Vec::len);
        let mut min = vec![f64::INFINITY; f];
        let mut max = vec![f64::NEG_INFINITY; f];
        for r in rows {
            for (j, v) in r.iter().enumerate() {
                min[j] = min[j].min(*v);
                max[j] = max[j].max(*v);
            }
        }
        MinMaxScaler { min, max }
    }

    fn range(&self, j: usize) -> f64 {
        let r = self.max[j] - self.min[j];
        if r.abs() < 1e-12 {
            1.0
        } else {
            r
        }
    }

    pub fn scale(&self, j: usize, v: f64) -> f64 {
        (v - self.min[j]) / self.range(j)
    }

    pub fn unscale(&self, j: usize, v: f64) -> f64 {
        v * self.range(j) + self.min[j]
    }
}

/// How a feature enters the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Price-like (close, sma_20, …): `ln(x / last close of the window)`,
    /// scale-free, so trending prices never leave the training range.
    RelativeToLastClose,
    /// Everything else: min-max scaled with the training split's range.
    MinMax,
}

/// The encoding of a feature column.
pub fn encoding_of(feature: &str) -> Encoding {
    match feature {
        "open" | "high" | "low" | "close" | "sma_20" | "ema_12" | "ema_26" => {
            Encoding::RelativeToLastClose
        }
        _ => Encoding::MinMax,
    }
}

/// Encodes one window of unscaled rows into model inputs (row-major).
/// Training and serving both call this, so they cannot drift apart.
pub fn encode_window(
    window: &[Vec<f64>],
    encodings: &[Encoding],
    target: usize,
    scaler: &MinMaxScaler,
    out: &mut Vec<f32>,
) {
    let last = window.last().map(|r| r[target]).unwrap_or(1.0);
    for r in window {
        for (j, v) in r.iter().enumerate() {
            let x = match encodings[j] {
                Encoding::RelativeToLastClose => (v / last).ln(),
                Encoding::MinMax => scaler.scale(j, *v),
            };
            out.push(x as f32);
        }
    }
}

/// What a model predicts, as `meta.json` names it: the standardized next
/// log return of the `close` column.
pub const TARGET: &str = "log_return";

/// The column whose next log return is the target.
pub fn target_column(features: &[String]) -> Option<usize> {
    features.iter().position(|f| f == "close")
}

/// Windows ready for training.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Complete feature rows, oldest first (unscaled).
    pub rows: Vec<Vec<f64>>,
    pub ts: Vec<chrono::DateTime<chrono::Utc>>,
    pub seq_len: usize,
    /// Index of `close` among the features.
    pub target: usize,
    /// Samples `[0, split)` train, `[split, n_samples)` validate. Sample `i`
    /// reads rows `i..i+seq_len` and predicts row `i+seq_len`'s close.
    pub split: usize,
    pub scaler: MinMaxScaler,
    pub target_scale: TargetScale,
    pub encodings: Vec<Encoding>,
}

/// Standardization of the target (the next log return).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TargetScale {
    pub mean: f64,
    pub std: f64,
}

impl TargetScale {
    pub fn scale(&self, r: f64) -> f64 {
        (r - self.mean) / self.std
    }
    pub fn unscale(&self, z: f64) -> f64 {
        z * self.std + self.mean
    }
    /// The close after `last` given a scaled predicted return.
    pub fn close_after(&self, last: f64, z: f64) -> f64 {
        last * self.unscale(z).exp()
    }
}

impl Dataset {
    /// `features` names the columns of `rows`; `close` is the target.
    pub fn build(
        rows: &[AggRow],
        features: &[String],
        seq_len: usize,
        val_fraction: f64,
    ) -> Result<Self> {
        let target = target_column(features)
            .ok_or_else(|| Error::invalid("train.features", "must include close"))?;
        let encodings = features.iter().map(|f| encoding_of(f)).collect();
        let (ts, rows): (Vec<_>, Vec<Vec<f64>>) = rows
            .iter()
            .filter_map(|r| {
                let v: Option<Vec<f64>> = r
                    .values
                    .iter()
                    .map(|v| v.filter(|x| x.is_finite()))
                    .collect();
                v.map(|v| (r.ts, v))
            })
            .unzip();
        let n_samples = rows.len().saturating_sub(seq_len);
        let n_val = ((n_samples as f64) * val_fraction).round() as usize;
        if n_samples < 20 || n_val < 5 {
            return Err(Error::invalid(
                "training data",
                format!(
                    "{} complete rows give {n_samples} windows of {seq_len}; at least 20 windows with 5 for validation are needed",
                    rows.len()
                ),
            ));
        }
        let split = n_samples - n_val;
        let scaler = MinMaxScaler::fit(&rows[..split + seq_len]);
        let ret = |i: usize| (rows[i + seq_len][target] / rows[i + seq_len - 1][target]).ln();
        let train: Vec<f64> = (0..split).map(ret).collect();
        let mean = train.iter().sum::<f64>() / split as f64;
        let var = train.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / split as f64;
        let target_scale = TargetScale {
            mean,
            std: var.sqrt().max(1e-9),
        };
        Ok(Dataset {
            rows,
            ts,
            seq_len,
            target,
            split,
            scaler,
            target_scale,
            encodings,
        })
    }

    pub fn n_samples(&self) -> usize {
        self.rows.len() - self.seq_len
    }

    pub fn n_features(&self) -> usize {
        self.rows[0].len()
    }

    /// Scaled inputs `[n, seq_len, features]` (flattened) and scaled target returns
    /// of the samples `idx`.
    pub fn batch(&self, idx: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let f = self.n_features();
        let mut x = Vec::with_capacity(idx.len() * self.seq_len * f);
        let mut y = Vec::with_capacity(idx.len());
        for &i in idx {
            encode_window(
                &self.rows[i..i + self.seq_len],
                &self.encodings,
                self.target,
                &self.scaler,
                &mut x,
            );
            let (next, last) = self.target_and_last(i);
            y.push(self.target_scale.scale((next / last).ln()) as f32);
        }
        (x, y)
    }

    /// The unscaled close that sample `i` predicts, and the last close it sees.
    pub fn target_and_last(&self, i: usize) -> (f64, f64) {
        (
            self.rows[i + self.seq_len][self.target],
            self.rows[i + self.seq_len - 1][self.target],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaler_is_fitted_on_training_rows_only() {
        let rows: Vec<AggRow> = (0..100)
            .map(|i| AggRow {
                ts: chrono::DateTime::from_timestamp(i * 60, 0).unwrap(),
                values: vec![Some(i as f64), if i < 3 { None } else { Some(1.0) }],
            })
            .collect();
        let features = vec!["close".to_string(), "rsi_14".to_string()];
        let d = Dataset::build(&rows, &features, 10, 0.2).unwrap();
        assert_eq!(d.rows.len(), 97);
        assert_eq!(d.n_samples(), 87);
        assert_eq!(d.split, 87 - 17);
        // Training samples see rows up to split + seq_len - 1, close 3 + 79 = 82.
        assert_eq!(d.scaler.max[0], 82.0);
        assert_eq!(d.scaler.min[0], 3.0);
        let (x, y) = d.batch(&[0]);
        assert_eq!(x.len(), 20);
        // close is encoded relative to the window's last close (12): ln(3/12) first, 0 last.
        assert!((x[0] as f64 - (3.0f64 / 12.0).ln()).abs() < 1e-6);
        assert_eq!(x[18], 0.0);
        let r = (13.0f64 / 12.0).ln();
        assert!((y[0] as f64 - d.target_scale.scale(r)).abs() < 1e-5);
        assert!((d.target_scale.close_after(12.0, d.target_scale.scale(r)) - 13.0).abs() < 1e-9);
    }
}
