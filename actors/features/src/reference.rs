//! The indicators as whole-series functions, oldest first, written as
//! TA-Lib's C loops are (one pass over an array per function; deviations
//! in two passes over each window): an
//! independent formulation kept, for tests only, as the oracle the
//! incremental [`crate::IndicatorState`] is checked against bit for bit.
//! Each returns one value per input point, `None` before TA-Lib's first
//! output. The test `tests/talib.rs` checks the same columns against TA-Lib.

type Series = Vec<Option<f64>>;

/// TA-Lib's SMA over `x[from..]` (values before `from + n − 1` are `None`).
pub fn sma_from(x: &[f64], from: usize, n: usize) -> Series {
    let mut out = vec![None; x.len()];
    let start = from + n - 1;
    if x.len() <= start {
        return out;
    }
    let mut total = 0.0;
    for v in &x[from..start] {
        total += v;
    }
    for i in start..x.len() {
        total += x[i];
        let t = total;
        total -= x[i + 1 - n];
        out[i] = Some(t / n as f64);
    }
    out
}

pub fn sma(x: &[f64], n: usize) -> Series {
    sma_from(x, 0, n)
}

fn k(n: usize) -> f64 {
    2.0 / (n as f64 + 1.0)
}

/// TA-Lib's EMA over `x[from..]`: seeded with the SMA of its first `n`.
pub fn ema_from(x: &[f64], from: usize, n: usize) -> Series {
    let mut out = vec![None; x.len()];
    if x.len() < from + n {
        return out;
    }
    let mut e = 0.0;
    for v in &x[from..from + n] {
        e += v;
    }
    e /= n as f64;
    out[from + n - 1] = Some(e);
    for i in from + n..x.len() {
        e = ((x[i] - e) * k(n)) + e;
        out[i] = Some(e);
    }
    out
}

pub fn ema(x: &[f64], n: usize) -> Series {
    ema_from(x, 0, n)
}

/// TA-Lib's RSI.
pub fn rsi(x: &[f64], n: usize) -> Series {
    let mut out = vec![None; x.len()];
    if x.len() <= n {
        return out;
    }
    let value = |g: f64, l: f64| {
        let s = g + l;
        if s > 0.0 {
            100.0 * (g / s)
        } else {
            0.0
        }
    };
    let (mut gain, mut loss) = (0.0, 0.0);
    for i in 1..=n {
        let c = x[i] - x[i - 1];
        if c < 0.0 {
            loss -= c;
        } else {
            gain += c;
        }
    }
    loss /= n as f64;
    gain /= n as f64;
    out[n] = Some(value(gain, loss));
    for (i, slot) in out.iter_mut().enumerate().skip(n + 1) {
        let c = x[i] - x[i - 1];
        loss *= n as f64 - 1.0;
        gain *= n as f64 - 1.0;
        if c < 0.0 {
            loss -= c;
        } else {
            gain += c;
        }
        loss /= n as f64;
        gain /= n as f64;
        *slot = Some(value(gain, loss));
    }
    out
}

/// Natural log return `ln(x[i] / x[i-1])`.
pub fn log_return(x: &[f64]) -> Series {
    let mut out = vec![None; x.len()];
    for i in 1..x.len() {
        out[i] = Some((x[i] / x[i - 1]).ln());
    }
    out
}

/// TA-Lib's OBV: the first bar's volume, then ± volume on up/down closes.
pub fn obv(close: &[f64], volume: &[f64]) -> Series {
    let mut out = Vec::with_capacity(close.len());
    let Some(&v0) = volume.first() else {
        return out;
    };
    let mut acc = v0;
    out.push(Some(acc));
    for i in 1..close.len() {
        if close[i] > close[i - 1] {
            acc += volume[i];
        } else if close[i] < close[i - 1] {
            acc -= volume[i];
        }
        out.push(Some(acc));
    }
    out
}

/// TA-Lib's MACD: line, signal, histogram, all from bar slow+signal−2.
pub fn macd(x: &[f64], fast: usize, slow: usize, signal: usize) -> (Series, Series, Series) {
    let none = || vec![None; x.len()];
    if x.len() < slow {
        return (none(), none(), none());
    }
    let slow_e = ema(x, slow);
    // The fast EMA is seeded with the fast closes ending at bar slow−1.
    let fast_e = ema_from(x, slow - fast, fast);
    let line: Vec<f64> = (slow - 1..x.len())
        .map(|i| fast_e[i].unwrap() - slow_e[i].unwrap())
        .collect();
    let sig = ema(&line, signal);
    let (mut l, mut s, mut h) = (none(), none(), none());
    for (j, sv) in sig.iter().enumerate() {
        if let Some(sv) = *sv {
            let i = slow - 1 + j;
            l[i] = Some(line[j]);
            s[i] = Some(sv);
            h[i] = Some(line[j] - sv);
        }
    }
    (l, s, h)
}

/// TA-Lib's STOCHF: fast %K and its SMA %D, both from bar k+d−2.
pub fn stochf(high: &[f64], low: &[f64], close: &[f64], kn: usize, dn: usize) -> (Series, Series) {
    let mut kv = vec![0.0; close.len()];
    for i in kn - 1..close.len() {
        let hh = high[i + 1 - kn..=i]
            .iter()
            .copied()
            .fold(f64::MIN, f64::max);
        let ll = low[i + 1 - kn..=i].iter().copied().fold(f64::MAX, f64::min);
        let range = hh - ll;
        kv[i] = if range.abs() <= 1e-14 * (hh.abs() + ll.abs()) {
            0.0
        } else {
            ((close[i] - ll) / range) * 100.0
        };
    }
    let d = sma_from(&kv, kn - 1, dn);
    let k = d
        .iter()
        .enumerate()
        .map(|(i, d)| d.map(|_| kv[i]))
        .collect();
    (k, d)
}

/// TA-Lib's BBANDS with an SMA middle: `(upper, middle, lower)`.
pub fn bbands(x: &[f64], n: usize, width: f64) -> (Series, Series, Series) {
    let middle = sma(x, n);
    let mut upper = vec![None; x.len()];
    let mut lower = vec![None; x.len()];
    if x.len() < n {
        return (upper, middle, lower);
    }
    for i in n - 1..x.len() {
        let m = middle[i].unwrap();
        let sd = deviation(&x[i + 1 - n..=i], m);
        upper[i] = Some(m + sd * width);
        lower[i] = Some(m - sd * width);
    }
    (upper, middle, lower)
}

/// TA-Lib's ATR.
pub fn atr(high: &[f64], low: &[f64], close: &[f64], n: usize) -> Series {
    let mut out = vec![None; close.len()];
    if close.len() <= n {
        return out;
    }
    let tr = |i: usize| {
        let mut g = high[i] - low[i];
        let a = (close[i - 1] - high[i]).abs();
        if a > g {
            g = a;
        }
        let b = (close[i - 1] - low[i]).abs();
        if b > g {
            g = b;
        }
        g
    };
    let trs: Vec<f64> = (1..=n).map(tr).collect();
    let mut a = sma(&trs, n)[n - 1].unwrap();
    out[n] = Some(a);
    for (i, slot) in out.iter_mut().enumerate().skip(n + 1) {
        a *= n as f64 - 1.0;
        a += tr(i);
        a /= n as f64;
        *slot = Some(a);
    }
    out
}

/// The population standard deviation of `w` around `mean` (two passes).
fn deviation(w: &[f64], mean: f64) -> f64 {
    let mut ss = 0.0;
    for x in w {
        ss += (x - mean) * (x - mean);
    }
    let var = ss / w.len() as f64;
    if var > 0.0 {
        var.sqrt()
    } else {
        0.0
    }
}

/// The population standard deviation of `x[from..]` over `n` points.
pub fn stddev_from(x: &[f64], from: usize, n: usize) -> Series {
    let mut out = vec![None; x.len()];
    for i in (from + n - 1)..x.len() {
        let w = &x[i + 1 - n..=i];
        let mut sum = 0.0;
        for v in w {
            sum += v;
        }
        out[i] = Some(deviation(w, sum / n as f64));
    }
    out
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
    fn rsi_extremes_flat_and_known_value() {
        let up: Vec<f64> = (0..30).map(|i| i as f64).collect();
        assert!(close(rsi(&up, 14)[29], 100.0));
        let down: Vec<f64> = (0..30).map(|i| -(i as f64)).collect();
        assert!(close(rsi(&down, 14)[29], 0.0));
        // A flat window: TA-Lib gives 0, not 100.
        assert!(close(rsi(&[5.0; 30], 14)[29], 0.0));
        // Alternating +2, -1 for 14 changes: avg gain 1, avg loss 0.5 -> RSI 66.67.
        let mut x = vec![10.0];
        for i in 0..14 {
            let last = *x.last().unwrap();
            x.push(if i % 2 == 0 { last + 2.0 } else { last - 1.0 });
        }
        assert!(close(rsi(&x, 14)[14], 100.0 - 100.0 / 3.0));
    }

    #[test]
    fn obv_log_return_macd_by_hand() {
        let c = [1.0, 2.0, 1.5, 1.5];
        let v = [10.0, 20.0, 5.0, 7.0];
        let o: Vec<f64> = obv(&c, &v).into_iter().map(Option::unwrap).collect();
        assert_eq!(o, vec![10.0, 30.0, 25.0, 25.0]);
        assert!(close(log_return(&c)[1], 2f64.ln()));
        let x: Vec<f64> = (0..80).map(|i| 100.0 + i as f64).collect();
        let (line, signal, hist) = macd(&x, 12, 26, 9);
        assert!(line[32].is_none() && line[33].is_some());
        assert!(signal[32].is_none() && signal[33].is_some());
        // On a straight line both EMAs lag by (n-1)/2 exactly once seeded
        // from SMAs of the line: EMA12 - EMA26 = (26-12)/2 = 7, histogram 0.
        assert!(close(line[79], 7.0) && close(hist[79], 0.0));
    }

    #[test]
    fn stoch_bands_atr_by_hand() {
        let h = [3.0, 4.0, 5.0, 6.0];
        let l = [1.0, 2.0, 3.0, 4.0];
        let c = [2.0, 3.0, 4.0, 4.0];
        let (k, d) = stochf(&h, &l, &c, 2, 2);
        // %K at bar 2: (4-2)/(5-2)*100 = 66.67; bar 3: (4-3)/(6-3)*100 = 33.33.
        assert_eq!(k[1], None);
        assert!(close(k[2], 200.0 / 3.0) && close(d[3], 50.0));
        let (u, m, lo) = bbands(&[1.0, 3.0], 2, 2.0);
        assert!(close(m[1], 2.0) && close(u[1], 4.0) && close(lo[1], 0.0));
        // True ranges: bar 1 max(2, |2-4|, |2-2|) = 2, bar 2 = 2, bar 3 = max(2, 2, 0) = 2.
        let a = atr(&h, &l, &c, 2);
        assert!(a[1].is_none() && close(a[2], 2.0) && close(a[3], 2.0));
        let s = stddev_from(&[0.0, 1.0, 3.0], 1, 2);
        assert!(s[1].is_none() && close(s[2], 1.0));
    }
}
