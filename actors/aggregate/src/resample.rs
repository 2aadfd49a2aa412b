//! Resampling bars to an interval on the New York clock: intraday buckets
//! are floored to a multiple of the interval since New York midnight; daily
//! buckets are New York trading dates. A bucket's timestamp is its first
//! bar's; OHLC are first/max/min/last, volume and trade count are summed,
//! `vw` is volume-weighted.

use chrono::Timelike;
use chrono_tz::America::New_York;
use tickmesh_core::types::{Bar, Interval};

fn bucket(b: &Bar, interval: Interval) -> (chrono::NaiveDate, i64) {
    let local = b.t.with_timezone(&New_York);
    let minute_of_day = local.hour() as i64 * 60 + local.minute() as i64;
    match interval.minutes() {
        Some(m) => (local.date_naive(), minute_of_day / m),
        None => (local.date_naive(), 0),
    }
}

/// Resamples time-sorted bars to `interval`.
pub fn resample(bars: &[Bar], interval: Interval) -> Vec<Bar> {
    if interval == Interval::M1 {
        return bars.to_vec();
    }
    let mut out: Vec<Bar> = Vec::new();
    let mut cur_key = None;
    let mut pv = 0.0;
    for b in bars {
        let key = bucket(b, interval);
        if cur_key == Some(key) {
            let last = out.last_mut().expect("a bucket is open");
            last.h = last.h.max(b.h);
            last.l = last.l.min(b.l);
            last.c = b.c;
            last.v += b.v;
            last.n += b.n;
            pv += b.vw * b.v as f64;
            last.vw = if last.v > 0 {
                pv / last.v as f64
            } else {
                last.c
            };
        } else {
            cur_key = Some(key);
            pv = b.vw * b.v as f64;
            out.push(*b);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tickmesh_core::synthetic::SyntheticMarket;

    #[test]
    fn daily_and_hourly() {
        let d = |s: &str| s.parse().unwrap();
        let bars = SyntheticMarket.bars("R", d("2024-03-04"), d("2024-03-08"));
        let daily = resample(&bars, Interval::D1);
        assert_eq!(daily.len(), 5);
        let day0 = &bars[..390];
        assert_eq!(daily[0].o, day0[0].o);
        assert_eq!(daily[0].c, day0[389].c);
        assert_eq!(daily[0].v, day0.iter().map(|b| b.v).sum::<u64>());
        assert_eq!(
            daily[0].h,
            day0.iter().map(|b| b.h).fold(f64::MIN, f64::max)
        );
        // 09:30-16:00 on the hour clock: 09:xx, 10..15 -> 7 buckets a day.
        assert_eq!(resample(&bars, Interval::H1).len(), 35);
        assert_eq!(resample(&bars, Interval::M15).len(), 5 * 26);
    }
}
