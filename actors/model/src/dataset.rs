//! Feature rows → model inputs: the encoding, the scalers and the windows.
//!
//! Rows with a missing selected feature (indicator warm-up) are dropped
//! first. Sample `i` reads rows `i..i+seq_len` and predicts the log return
//! from row `i+seq_len-1`'s close to row `i+seq_len`'s, standardized.
//! Predicting the return (not the price level) keeps the model inside the
//! range it was trained on when prices trend, and makes "no change" the easy
//! default.
//!
//! The split is chronological: the first samples train, the next
//! `val_fraction` validate (early stopping selects on them) and the last
//! `test_fraction` test (the reported metrics; nothing selects on them).
//! The scalers are fitted on the rows only the training samples read as
//! inputs (`[0, n_train + seq_len - 1)`), never on a row a validation or
//! test window reads; the target scale on the training samples' returns.

use std::ops::Range;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};
use tickmesh_core::types::AggRow;
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

/// What a model predicts, as `meta.json` names it: the standardized next
/// log return of the `close` column.
pub const TARGET: &str = "log_return";

/// The column whose next log return is the target.
pub fn target_column(features: &[String]) -> Option<usize> {
    features.iter().position(|f| f == "close")
}

/// How features become inputs: shared by training, evaluation and serving,
/// so they cannot drift apart.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoder {
    pub encodings: Vec<Encoding>,
    /// Index of `close` among the features.
    pub target: usize,
    pub scaler: MinMaxScaler,
    pub target_scale: TargetScale,
}

impl Encoder {
    /// Encodes one window of unscaled rows into model inputs (row-major, appended to `out`).
    pub fn encode_window<R: AsRef<[f64]>>(&self, window: &[R], out: &mut Vec<f32>) {
        let last = window
            .last()
            .map(|r| r.as_ref()[self.target])
            .unwrap_or(1.0);
        for r in window {
            for (j, v) in r.as_ref().iter().enumerate() {
                let x = match self.encodings[j] {
                    Encoding::RelativeToLastClose => (v / last).ln(),
                    Encoding::MinMax => self.scaler.scale(j, *v),
                };
                out.push(x as f32);
            }
        }
    }
}

/// How the samples divide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Splits {
    pub train: Range<usize>,
    pub validation: Range<usize>,
    pub test: Range<usize>,
}

/// Windows ready for training or evaluation.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub features: Vec<String>,
    /// Complete feature rows, oldest first (unscaled).
    pub rows: Vec<Vec<f64>>,
    pub ts: Vec<DateTime<Utc>>,
    pub seq_len: usize,
    pub encoder: Encoder,
    pub splits: Splits,
    /// A permutation of the training samples' targets (a deliberately
    /// worse model, for the tests of the promotion gate); `None`: each
    /// sample's own.
    pub shuffled_targets: Option<Vec<usize>>,
}

/// Minimum windows per split.
const MIN_TRAIN: usize = 20;
const MIN_HELD_OUT: usize = 5;

/// The fewest windows that split into at least `MIN_TRAIN` training and
/// `MIN_HELD_OUT` validation and test windows.
fn needed(val_fraction: f64, test_fraction: f64) -> usize {
    (MIN_TRAIN + 2 * MIN_HELD_OUT..)
        .find(|&n| {
            let f = n as f64;
            let (v, t) = (
                (f * val_fraction).round() as usize,
                (f * test_fraction).round() as usize,
            );
            v >= MIN_HELD_OUT && t >= MIN_HELD_OUT && n.saturating_sub(v + t) >= MIN_TRAIN
        })
        .expect("fractions below 1 leave room to train")
}

/// Keeps the rows whose every value is present and finite.
fn complete(rows: &[AggRow]) -> (Vec<DateTime<Utc>>, Vec<Vec<f64>>) {
    rows.iter()
        .filter_map(|r| {
            let v: Option<Vec<f64>> = r
                .values
                .iter()
                .map(|v| v.filter(|x| x.is_finite()))
                .collect();
            v.map(|v| (r.ts, v))
        })
        .unzip()
}

fn target_of(features: &[String]) -> Result<usize> {
    target_column(features).ok_or_else(|| Error::invalid("features", "must include close"))
}

impl Dataset {
    /// Splits `rows` (columns named by `features`; `close` is the target)
    /// chronologically and fits the scalers on the training split.
    pub fn build(
        rows: &[AggRow],
        features: &[String],
        seq_len: usize,
        val_fraction: f64,
        test_fraction: f64,
    ) -> Result<Self> {
        let target = target_of(features)?;
        let (ts, rows) = complete(rows);
        let n = rows.len().saturating_sub(seq_len);
        let n_test = ((n as f64) * test_fraction).round() as usize;
        let n_val = ((n as f64) * val_fraction).round() as usize;
        let n_train = n.saturating_sub(n_val + n_test);
        if n_train < MIN_TRAIN || n_test < MIN_HELD_OUT || n_val < MIN_HELD_OUT {
            return Err(Error::invalid(
                "training data",
                format!(
                    "too few rows: {} complete rows give {n} windows of seq_len {seq_len}; at least {} windows are needed ({MIN_TRAIN} to train, {MIN_HELD_OUT} to validate, {MIN_HELD_OUT} to test)",
                    rows.len(),
                    needed(val_fraction, test_fraction)
                ),
            ));
        }
        let splits = Splits {
            train: 0..n_train,
            validation: n_train..n_train + n_val,
            test: n_train + n_val..n,
        };
        let scaler = MinMaxScaler::fit(&rows[..n_train + seq_len - 1]);
        let ret = |i: usize| (rows[i + seq_len][target] / rows[i + seq_len - 1][target]).ln();
        let train: Vec<f64> = (0..n_train).map(ret).collect();
        let mean = train.iter().sum::<f64>() / n_train as f64;
        let var = train.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n_train as f64;
        let target_scale = TargetScale {
            mean,
            std: var.sqrt().max(1e-9),
        };
        Ok(Dataset {
            features: features.to_vec(),
            rows,
            ts,
            seq_len,
            encoder: Encoder {
                encodings: features.iter().map(|f| encoding_of(f)).collect(),
                target,
                scaler,
                target_scale,
            },
            splits,
            shuffled_targets: None,
        })
    }

    /// Every window of `rows` encoded with a fitted `encoder` (a saved
    /// model's); all of them form the test split.
    pub fn with_encoder(
        rows: &[AggRow],
        features: &[String],
        seq_len: usize,
        encoder: Encoder,
    ) -> Result<Self> {
        let (ts, rows) = complete(rows);
        let n = rows.len().saturating_sub(seq_len);
        if n == 0 {
            return Err(Error::invalid(
                "evaluation data",
                format!(
                    "too few rows: {} complete rows give no window of seq_len {seq_len} with a next close",
                    rows.len()
                ),
            ));
        }
        Ok(Dataset {
            features: features.to_vec(),
            rows,
            ts,
            seq_len,
            encoder,
            splits: Splits {
                train: 0..0,
                validation: 0..0,
                test: 0..n,
            },
            shuffled_targets: None,
        })
    }

    /// Gives each training sample another training sample's target
    /// (seeded): a model trained on it learns nothing real. Validation and
    /// test keep their own targets. Only the gate's tests use it.
    pub fn shuffle_training_targets(&mut self, seed: u64) {
        use rand::seq::SliceRandom;
        let mut perm: Vec<usize> = self.splits.train.clone().collect();
        perm.shuffle(&mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed));
        self.shuffled_targets = Some(perm);
    }

    pub fn n_samples(&self) -> usize {
        self.rows.len() - self.seq_len
    }

    pub fn n_features(&self) -> usize {
        self.features.len()
    }

    /// The encoded input window of sample `i`, `[seq_len * features]`.
    pub fn window(&self, i: usize) -> Vec<f32> {
        let mut x = Vec::with_capacity(self.seq_len * self.n_features());
        self.encoder
            .encode_window(&self.rows[i..i + self.seq_len], &mut x);
        x
    }

    /// The timestamp of the bar sample `i` predicts.
    pub fn target_ts(&self, i: usize) -> DateTime<Utc> {
        self.ts[i + self.seq_len]
    }

    /// The unscaled close sample `i` predicts, and the last close it sees.
    pub fn target_and_last(&self, i: usize) -> (f64, f64) {
        let t = self.encoder.target;
        (
            self.rows[i + self.seq_len][t],
            self.rows[i + self.seq_len - 1][t],
        )
    }

    /// Inputs `[n, seq_len, features]` and scaled targets `[n]` of the
    /// samples in `range`, on `device`.
    pub fn tensors(&self, range: Range<usize>, device: Device) -> (Tensor, Tensor) {
        let n = range.len();
        let mut x = Vec::with_capacity(n * self.seq_len * self.n_features());
        let mut y = Vec::with_capacity(n);
        for i in range {
            self.encoder
                .encode_window(&self.rows[i..i + self.seq_len], &mut x);
            let j = match &self.shuffled_targets {
                Some(perm) if self.splits.train.contains(&i) => perm[i - self.splits.train.start],
                _ => i,
            };
            let (next, last) = self.target_and_last(j);
            y.push(self.encoder.target_scale.scale((next / last).ln()) as f32);
        }
        let x = Tensor::from_slice(&x)
            .reshape([n as i64, self.seq_len as i64, self.n_features() as i64])
            .to_device(device);
        (x, Tensor::from_slice(&y).to_device(device))
    }

    /// The data range of the samples in `range`: first input row to last target row.
    pub fn span(&self, range: &Range<usize>) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        (!range.is_empty()).then(|| (self.ts[range.start], self.ts[range.end - 1 + self.seq_len]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_chronological_and_scalers_see_training_rows_only() {
        let rows: Vec<AggRow> = (0..140)
            .map(|i| AggRow {
                ts: DateTime::from_timestamp(i * 60, 0).unwrap(),
                values: vec![
                    Some(i as f64 + 1.0),
                    if i < 3 { None } else { Some(i as f64) },
                ],
            })
            .collect();
        let features = vec!["close".to_string(), "rsi_14".to_string()];
        let d = Dataset::build(&rows, &features, 10, 0.2, 0.1).unwrap();
        assert_eq!(d.rows.len(), 137);
        assert_eq!(d.n_samples(), 127);
        assert_eq!(d.splits.test, 114..127);
        assert_eq!(d.splits.validation, 89..114);
        assert_eq!(d.splits.train, 0..89);
        // Training samples read rows up to 89 + 10 - 2 = 97 as inputs: rsi 3 + 97 = 100.
        assert_eq!(d.encoder.scaler.max[1], 100.0);
        assert_eq!(d.encoder.scaler.min[1], 3.0);
        let x = d.window(0);
        assert_eq!(x.len(), 20);
        // close is encoded relative to the window's last close (13): ln(4/13) first, 0 last.
        assert!((x[0] as f64 - (4.0f64 / 13.0).ln()).abs() < 1e-6);
        assert_eq!(x[18], 0.0);
        let (_, y) = d.tensors(0..1, Device::Cpu);
        let r = (14.0f64 / 13.0).ln();
        let y0 = y.double_value(&[0]);
        assert!((y0 - d.encoder.target_scale.scale(r)).abs() < 1e-5);
        let ts = d.encoder.target_scale;
        assert!((ts.close_after(13.0, ts.scale(r)) - 14.0).abs() < 1e-9);
    }

    #[test]
    fn too_few_rows_say_how_many_are_needed() {
        let rows: Vec<AggRow> = (0..40)
            .map(|i| AggRow {
                ts: DateTime::from_timestamp(i * 60, 0).unwrap(),
                values: vec![Some(1.0 + i as f64)],
            })
            .collect();
        let e = Dataset::build(&rows, &["close".into()], 30, 0.15, 0.15)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("too few rows") && e.contains("seq_len 30"),
            "{e}"
        );
    }
}
