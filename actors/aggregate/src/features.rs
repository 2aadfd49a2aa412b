//! One `aggregated_data` row per bar, with every column of
//! [`FEATURE_COLUMNS`] in order. Shared by the aggregator (historical load)
//! and the predictors (features of forecast steps), so training and serving
//! compute features the same way.

use tickmesh_core::config::FEATURE_COLUMNS;
use tickmesh_core::db::AggRow;
use tickmesh_core::types::Bar;

use crate::indicators::{ema, log_return, macd, obv, rsi, sma};

/// Computes the feature rows of time-sorted bars.
pub fn feature_rows(bars: &[Bar]) -> Vec<AggRow> {
    let close: Vec<f64> = bars.iter().map(|b| b.c).collect();
    let volume: Vec<f64> = bars.iter().map(|b| b.v as f64).collect();
    let (macd_line, macd_signal) = macd(&close);
    let columns: Vec<Vec<Option<f64>>> = vec![
        bars.iter().map(|b| Some(b.o)).collect(),
        bars.iter().map(|b| Some(b.h)).collect(),
        bars.iter().map(|b| Some(b.l)).collect(),
        close.iter().map(|c| Some(*c)).collect(),
        volume.iter().map(|v| Some(*v)).collect(),
        log_return(&close),
        sma(&close, 20),
        ema(&close, 12),
        ema(&close, 26),
        macd_line,
        macd_signal,
        rsi(&close, 14),
        obv(&close, &volume),
    ];
    debug_assert_eq!(columns.len(), FEATURE_COLUMNS.len());
    bars.iter()
        .enumerate()
        .map(|(i, b)| AggRow {
            ts: b.t,
            values: columns.iter().map(|c| c[i]).collect(),
        })
        .collect()
}

/// The index of a feature column in [`FEATURE_COLUMNS`].
pub fn column_index(name: &str) -> Option<usize> {
    FEATURE_COLUMNS.iter().position(|c| *c == name)
}
