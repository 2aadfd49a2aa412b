//! The indicators as whole-series functions, oldest first: an independent
//! formulation kept (for tests only) as the oracle the incremental
//! [`crate::IndicatorState`] is checked against, bit for bit. Each returns one
//! value per input point, `None` while the indicator warms up. EMAs are
//! seeded with the SMA of their first `n` points; RSI uses Wilder's smoothing
//! seeded with the mean of the first `n` changes. These are not claimed to
//! be TA-Lib's conventions: MACD seeding, OBV's start and a flat RSI window
//! differ from TA-Lib (see the aggregation issue).

/// Simple moving average over `n` points.
pub fn sma(x: &[f64], n: usize) -> Vec<Option<f64>> {
    let mut out = vec![None; x.len()];
    if n == 0 || x.len() < n {
        return out;
    }
    let mut sum: f64 = x[..n].iter().sum();
    out[n - 1] = Some(sum / n as f64);
    for i in n..x.len() {
        sum += x[i] - x[i - n];
        out[i] = Some(sum / n as f64);
    }
    out
}

/// Exponential moving average with span `n` (alpha = 2 / (n + 1)).
pub fn ema(x: &[f64], n: usize) -> Vec<Option<f64>> {
    let mut out = vec![None; x.len()];
    if n == 0 || x.len() < n {
        return out;
    }
    let alpha = 2.0 / (n as f64 + 1.0);
    let mut e = x[..n].iter().sum::<f64>() / n as f64;
    out[n - 1] = Some(e);
    for i in n..x.len() {
        e += alpha * (x[i] - e);
        out[i] = Some(e);
    }
    out
}

/// EMA over a series that starts with `None`s (e.g. MACD before it is defined).
pub fn ema_opt(x: &[Option<f64>], n: usize) -> Vec<Option<f64>> {
    let start = x.iter().position(Option::is_some).unwrap_or(x.len());
    let vals: Vec<f64> = x[start..].iter().map(|v| v.unwrap_or(f64::NAN)).collect();
    let mut out = vec![None; start];
    out.extend(ema(&vals, n));
    out
}

/// Relative strength index over `n` changes (Wilder).
pub fn rsi(x: &[f64], n: usize) -> Vec<Option<f64>> {
    let mut out = vec![None; x.len()];
    if n == 0 || x.len() <= n {
        return out;
    }
    let change = |i: usize| x[i] - x[i - 1];
    let (mut gain, mut loss) = (0.0, 0.0);
    for i in 1..=n {
        let c = change(i);
        if c > 0.0 {
            gain += c;
        } else {
            loss -= c;
        }
    }
    gain /= n as f64;
    loss /= n as f64;
    let value = |g: f64, l: f64| {
        if l == 0.0 {
            100.0
        } else {
            100.0 - 100.0 / (1.0 + g / l)
        }
    };
    out[n] = Some(value(gain, loss));
    for (i, slot) in out.iter_mut().enumerate().skip(n + 1) {
        let c = change(i);
        gain = (gain * (n as f64 - 1.0) + c.max(0.0)) / n as f64;
        loss = (loss * (n as f64 - 1.0) + (-c).max(0.0)) / n as f64;
        *slot = Some(value(gain, loss));
    }
    out
}

/// Natural log return `ln(x[i] / x[i-1])`.
pub fn log_return(x: &[f64]) -> Vec<Option<f64>> {
    let mut out = vec![None; x.len()];
    for i in 1..x.len() {
        out[i] = Some((x[i] / x[i - 1]).ln());
    }
    out
}

/// On-balance volume, starting at 0.
pub fn obv(close: &[f64], volume: &[f64]) -> Vec<Option<f64>> {
    let mut out = Vec::with_capacity(close.len());
    let mut acc = 0.0;
    for i in 0..close.len() {
        if i > 0 {
            if close[i] > close[i - 1] {
                acc += volume[i];
            } else if close[i] < close[i - 1] {
                acc -= volume[i];
            }
        }
        out.push(Some(acc));
    }
    out
}

/// MACD line (EMA12 − EMA26) and its 9-period signal line.
pub fn macd(x: &[f64]) -> (Vec<Option<f64>>, Vec<Option<f64>>) {
    let (fast, slow) = (ema(x, 12), ema(x, 26));
    let line: Vec<Option<f64>> = fast
        .iter()
        .zip(&slow)
        .map(|(f, s)| Some((*f)? - (*s)?))
        .collect();
    let signal = ema_opt(&line, 9);
    (line, signal)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    #[test]
    fn sma_and_ema_by_hand() {
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        let s = sma(&x, 3);
        assert_eq!(s[1], None);
        assert!(close(s[2], 2.0) && close(s[4], 4.0));
        let e = ema(&x, 3);
        assert!(close(e[2], 2.0));
        assert!(close(e[3], 3.0)); // 2 + 0.5 * (4 - 2)
        assert!(close(e[4], 4.0));
    }

    #[test]
    fn rsi_extremes_and_known_value() {
        let up: Vec<f64> = (0..30).map(|i| i as f64).collect();
        assert!(close(rsi(&up, 14)[29], 100.0));
        let down: Vec<f64> = (0..30).map(|i| -(i as f64)).collect();
        assert!(close(rsi(&down, 14)[29], 0.0));
        // Alternating +2, -1 for 14 changes: avg gain 1, avg loss 0.5 -> RS 2 -> RSI 66.67.
        let mut x = vec![10.0];
        for i in 0..14 {
            let last = *x.last().unwrap();
            x.push(if i % 2 == 0 { last + 2.0 } else { last - 1.0 });
        }
        assert!(close(rsi(&x, 14)[14], 100.0 - 100.0 / 3.0));
    }

    #[test]
    fn obv_log_return_macd() {
        let c = [1.0, 2.0, 1.5, 1.5];
        let v = [10.0, 20.0, 5.0, 7.0];
        let o: Vec<f64> = obv(&c, &v).into_iter().map(Option::unwrap).collect();
        assert_eq!(o, vec![0.0, 20.0, 15.0, 15.0]);
        assert!(close(log_return(&c)[1], 2f64.ln()));
        let x: Vec<f64> = (0..60).map(|i| 100.0 + i as f64).collect();
        let (line, signal) = macd(&x);
        assert!(line[24].is_none() && line[25].is_some());
        assert!(signal[32].is_none() && signal[33].is_some());
        // On a straight line EMA12 - EMA26 converges to (26-12)/2 = 7.
        assert!((line[59].unwrap() - 7.0).abs() < 0.1);
    }
}
