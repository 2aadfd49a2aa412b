//! Forecast errors in price units, always beside the naive persistence
//! forecast (the next close equals the last one).
//!
//! Directional accuracy counts only samples whose actual close moved: a flat
//! move (next close exactly equal to the last) is neither up nor down, so it is left out and counted in `flat_moves`. Among the moves,
//! a prediction is right when it moved the same way; a prediction of no move
//! is never right. The naive forecast never moves, so it has no directional
//! accuracy.

use serde::{Deserialize, Serialize};

/// One evaluated sample: the actual close, the prediction and the last
/// close the model saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    pub actual: f64,
    pub predicted: f64,
    pub last: f64,
}

/// Errors of one forecaster over a set of samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub mae: f64,
    pub mse: f64,
    pub rmse: f64,
    /// Mean absolute percentage error, in percent.
    pub mape: f64,
    /// Share of moving samples whose direction was predicted right; `None`
    /// for a forecaster that never moves (naive) or when nothing moved.
    pub directional_accuracy: Option<f64>,
    pub samples: usize,
}

/// The model's error divided by the naive forecast's (below 1: better than
/// naive); `None` where the naive error is 0 (a series that never moved).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Ratios {
    pub mae: Option<f64>,
    pub mse: Option<f64>,
    pub rmse: Option<f64>,
    pub mape: Option<f64>,
}

/// Model metrics with the naive baseline beside them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub model: Metrics,
    pub naive: Metrics,
    pub ratio_to_naive: Ratios,
    /// Samples whose actual close did not move (left out of directional accuracy).
    pub flat_moves: usize,
}

fn metrics(s: &[Scored], pred: impl Fn(&Scored) -> f64, directional: bool) -> Metrics {
    let n = s.len().max(1) as f64;
    let mae = s.iter().map(|x| (x.actual - pred(x)).abs()).sum::<f64>() / n;
    let mse = s.iter().map(|x| (x.actual - pred(x)).powi(2)).sum::<f64>() / n;
    let mape = 100.0
        * s.iter()
            .map(|x| ((x.actual - pred(x)) / x.actual).abs())
            .sum::<f64>()
        / n;
    let moving: Vec<&Scored> = s.iter().filter(|x| x.actual != x.last).collect();
    let directional_accuracy = (directional && !moving.is_empty()).then(|| {
        let right = moving
            .iter()
            .filter(|x| {
                let p = pred(x);
                p != x.last && (p > x.last) == (x.actual > x.last)
            })
            .count();
        right as f64 / moving.len() as f64
    });
    Metrics {
        mae,
        mse,
        rmse: mse.sqrt(),
        mape,
        directional_accuracy,
        samples: s.len(),
    }
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

impl EvalReport {
    pub fn of(samples: &[Scored]) -> Self {
        let model = metrics(samples, |x| x.predicted, true);
        let naive = metrics(samples, |x| x.last, false);
        EvalReport {
            model,
            naive,
            ratio_to_naive: Ratios {
                mae: ratio(model.mae, naive.mae),
                mse: ratio(model.mse, naive.mse),
                rmse: ratio(model.rmse, naive.rmse),
                mape: ratio(model.mape, naive.mape),
            },
            flat_moves: samples.iter().filter(|x| x.actual == x.last).count(),
        }
    }

    /// Whether every number is finite (JSON has no NaN or infinity).
    pub fn is_finite(&self) -> bool {
        let r = &self.ratio_to_naive;
        [self.model, self.naive].iter().all(|m| {
            [m.mae, m.mse, m.rmse, m.mape].iter().all(|v| v.is_finite())
                && m.directional_accuracy.is_none_or(f64::is_finite)
        }) && [r.mae, r.mse, r.rmse, r.mape]
            .iter()
            .all(|v| v.is_none_or(f64::is_finite))
    }

    /// The metrics as a text table, the naive baseline and the ratio beside the model.
    pub fn table(&self) -> String {
        let (m, n, r) = (&self.model, &self.naive, &self.ratio_to_naive);
        let da = |d: Option<f64>| d.map_or("-".to_string(), |d| format!("{:.1}%", d * 100.0));
        let q = |d: Option<f64>| d.map_or("-".to_string(), |d| format!("{d:.4}"));
        format!(
            "metric        model        naive        model/naive\n\
             MAE    {:>12.6} {:>12.6} {:>12}\n\
             MSE    {:>12.6} {:>12.6} {:>12}\n\
             RMSE   {:>12.6} {:>12.6} {:>12}\n\
             MAPE % {:>12.4} {:>12.4} {:>12}\n\
             DirAcc {:>12} {:>12} {:>12}\n\
             samples {} (flat moves, left out of DirAcc: {})\n",
            m.mae,
            n.mae,
            q(r.mae),
            m.mse,
            n.mse,
            q(r.mse),
            m.rmse,
            n.rmse,
            q(r.rmse),
            m.mape,
            n.mape,
            q(r.mape),
            da(m.directional_accuracy),
            da(n.directional_accuracy),
            "",
            m.samples,
            self.flat_moves
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_hand_with_a_flat_move() {
        let s = [
            // up, predicted up: right
            Scored {
                actual: 11.0,
                predicted: 10.5,
                last: 10.0,
            },
            // down, predicted up: wrong
            Scored {
                actual: 9.0,
                predicted: 10.2,
                last: 10.0,
            },
            // flat: left out of directional accuracy
            Scored {
                actual: 10.0,
                predicted: 10.1,
                last: 10.0,
            },
            // up, predicted no move: wrong
            Scored {
                actual: 12.0,
                predicted: 10.0,
                last: 10.0,
            },
        ];
        let r = EvalReport::of(&s);
        assert_eq!(r.flat_moves, 1);
        assert_eq!(r.model.directional_accuracy, Some(1.0 / 3.0));
        assert_eq!(r.naive.directional_accuracy, None);
        assert!((r.model.mae - (0.5 + 1.2 + 0.1 + 2.0) / 4.0).abs() < 1e-12);
        assert!((r.naive.mae - (1.0 + 1.0 + 0.0 + 2.0) / 4.0).abs() < 1e-12);
        assert!((r.naive.mse - 6.0 / 4.0).abs() < 1e-12);
        let mape = 100.0 * (0.5 / 11.0 + 1.2 / 9.0 + 0.1 / 10.0 + 2.0 / 12.0) / 4.0;
        assert!((r.model.mape - mape).abs() < 1e-9);
        assert!((r.ratio_to_naive.mae.unwrap() - r.model.mae / r.naive.mae).abs() < 1e-15);
        assert!(r.table().contains("model/naive"));
        assert!(r.is_finite());
        // A series that never moved: no ratio, and still valid JSON.
        let flat = EvalReport::of(&[Scored {
            actual: 5.0,
            predicted: 5.1,
            last: 5.0,
        }]);
        assert_eq!(flat.ratio_to_naive.rmse, None);
        assert!(flat.is_finite());
    }
}
