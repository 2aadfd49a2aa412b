//! Training windows and the min-max scaler.
//!
//! Rows with a missing feature (indicator warm-up) are dropped first. Samples
//! are `seq_len` consecutive rows and the next row's close as the target.
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
}

impl Dataset {
    pub fn build(
        rows: &[AggRow],
        seq_len: usize,
        target: usize,
        val_fraction: f64,
    ) -> Result<Self> {
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
        Ok(Dataset {
            rows,
            ts,
            seq_len,
            target,
            split,
            scaler,
        })
    }

    pub fn n_samples(&self) -> usize {
        self.rows.len() - self.seq_len
    }

    pub fn n_features(&self) -> usize {
        self.rows[0].len()
    }

    /// Scaled inputs `[n, seq_len, features]` (flattened) and scaled targets
    /// of the samples `idx`.
    pub fn batch(&self, idx: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let f = self.n_features();
        let mut x = Vec::with_capacity(idx.len() * self.seq_len * f);
        let mut y = Vec::with_capacity(idx.len());
        for &i in idx {
            for r in &self.rows[i..i + self.seq_len] {
                for (j, v) in r.iter().enumerate() {
                    x.push(self.scaler.scale(j, *v) as f32);
                }
            }
            y.push(
                self.scaler
                    .scale(self.target, self.rows[i + self.seq_len][self.target])
                    as f32,
            );
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
        let d = Dataset::build(&rows, 10, 0, 0.2).unwrap();
        assert_eq!(d.rows.len(), 97);
        assert_eq!(d.n_samples(), 87);
        assert_eq!(d.split, 87 - 17);
        // Training samples see rows up to split + seq_len - 1, close 3 + 79 = 82.
        assert_eq!(d.scaler.max[0], 82.0);
        assert_eq!(d.scaler.min[0], 3.0);
        let (x, y) = d.batch(&[0]);
        assert_eq!(x.len(), 20);
        assert!((y[0] - (13.0 - 3.0) / 79.0).abs() < 1e-6);
    }
}
