//! Resampling 1-minute bars to an interval of the NYSE regular session.
//!
//! - Only bars inside a trading day's regular session, `[open, close)` with
//!   the open at 09:30 New York and the close at 16:00 (13:00 on early-close
//!   days, [`calendar::session`]), reach a bucket. Pre- and post-market bars,
//!   and bars on days the exchange was closed, are left out and counted.
//! - Intraday buckets start at the open: bucket k of a day covers
//!   `[open + k·m, open + (k+1)·m)`, cut at the close, so the last bucket of a
//!   day may be shorter (1h: 15:30–16:00; on a half day, 12:30–13:00).
//! - Daily: one bar per session.
//! - A bar is labelled by its bucket's start (the session's open for daily
//!   bars); the forecaster's `next_timestamp` steps by the same rule.
//! - OHLCV: first open, highest high, lowest low, last close, summed volume
//!   and trade count; `vw` is the volume-weighted mean of the minutes' `vw`
//!   (the close when the bucket traded no volume).

use chrono::{DateTime, Duration, TimeZone, Utc};
use chrono_tz::America::New_York;
use tickmesh_core::calendar;
use tickmesh_core::types::{Bar, Interval};

/// Bars of one interval, and how many input bars were outside the regular session.
#[derive(Debug, Clone, PartialEq)]
pub struct Resampled {
    pub bars: Vec<Bar>,
    /// Input bars left out: pre- or post-market, or on a closed day.
    pub extended: usize,
}

/// The New York calendar day containing an instant, as a UTC range, and its
/// regular session.
#[derive(Clone, Copy)]
struct Day {
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    session: Option<(DateTime<Utc>, DateTime<Utc>)>,
}

impl Day {
    fn of(t: DateTime<Utc>) -> Day {
        let date = calendar::ny_date(t);
        let midnight = |d: chrono::NaiveDate| {
            New_York
                .from_local_datetime(&d.and_hms_opt(0, 0, 0).expect("valid time"))
                .earliest()
                .expect("New York midnight exists")
                .with_timezone(&Utc)
        };
        Day {
            start: midnight(date),
            end: midnight(date.succ_opt().expect("date in range")),
            session: calendar::session(date),
        }
    }

    fn contains(&self, t: DateTime<Utc>) -> bool {
        self.start <= t && t < self.end
    }
}

/// The start of the bucket of an instant inside a session opening at `open`.
fn bucket_start(t: DateTime<Utc>, open: DateTime<Utc>, interval: Interval) -> DateTime<Utc> {
    match interval.minutes() {
        None => open,
        Some(m) => {
            let width = m * 60;
            let since = (t - open).num_seconds();
            open + Duration::seconds(since - since.rem_euclid(width))
        }
    }
}

/// The end of the bucket that starts at `start` (a bucket label): one
/// interval later, cut at the session's close (a daily bucket ends at the
/// close).
pub fn bucket_end(start: DateTime<Utc>, interval: Interval) -> DateTime<Utc> {
    let close = calendar::session(calendar::ny_date(start)).map(|(_, close)| close);
    let end = interval.minutes().map(|m| start + Duration::minutes(m));
    match (end, close) {
        (Some(e), Some(c)) => e.min(c),
        (Some(e), None) => e,
        (None, Some(c)) => c,
        (None, None) => start + Duration::days(1),
    }
}

/// Resamples time-sorted 1-minute bars to `interval` on the regular session.
pub fn resample(bars: &[Bar], interval: Interval) -> Resampled {
    let mut out: Vec<Bar> = Vec::new();
    let mut extended = 0;
    let mut day: Option<Day> = None;
    let mut cur: Option<DateTime<Utc>> = None;
    let mut pv = 0.0;
    for b in bars {
        let d = match day {
            Some(d) if d.contains(b.t) => d,
            _ => *day.insert(Day::of(b.t)),
        };
        let Some((open, close)) = d.session.filter(|(o, c)| *o <= b.t && b.t < *c) else {
            extended += 1;
            continue;
        };
        debug_assert!(b.t < close);
        let start = bucket_start(b.t, open, interval);
        if cur == Some(start) {
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
            cur = Some(start);
            pv = b.vw * b.v as f64;
            let mut first = *b;
            first.t = start;
            if first.v == 0 {
                first.vw = first.c;
            }
            out.push(first);
        }
    }
    Resampled {
        bars: out,
        extended,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tickmesh_core::synthetic::SyntheticMarket;

    fn d(s: &str) -> chrono::NaiveDate {
        s.parse().unwrap()
    }

    fn ny(date: &str, hm: &str) -> DateTime<Utc> {
        let naive =
            chrono::NaiveDateTime::parse_from_str(&format!("{date} {hm}"), "%Y-%m-%d %H:%M")
                .unwrap();
        New_York
            .from_local_datetime(&naive)
            .single()
            .unwrap()
            .with_timezone(&Utc)
    }

    /// 1-minute bars from 04:00 to 20:00 New York (pre-market, the session,
    /// post-market) on each weekday of `from..=to`, closed days included.
    fn extended_day_bars(from: &str, to: &str) -> Vec<Bar> {
        let mut out = Vec::new();
        let mut px = 100.0;
        for date in d(from).iter_days().take_while(|x| *x <= d(to)) {
            if matches!(
                chrono::Datelike::weekday(&date),
                chrono::Weekday::Sat | chrono::Weekday::Sun
            ) {
                continue;
            }
            let start = ny(&date.to_string(), "04:00");
            for i in 0..16 * 60 {
                let o = px;
                px *= 1.0 + 0.0005 * (((i * 7919) % 11) as f64 / 5.0 - 1.0);
                out.push(Bar {
                    t: start + Duration::minutes(i),
                    o,
                    h: o.max(px) + 0.01,
                    l: o.min(px) - 0.01,
                    c: px,
                    v: 100 + (i % 37) as u64,
                    n: 3,
                    vw: (o + px) / 2.0,
                });
            }
        }
        out
    }

    #[test]
    fn daily_and_hourly_on_the_synthetic_market() {
        let bars = SyntheticMarket.bars("R", d("2024-03-04"), d("2024-03-08"));
        let daily = resample(&bars, Interval::D1);
        assert_eq!(daily.extended, 0);
        let daily = daily.bars;
        assert_eq!(daily.len(), 5);
        let day0 = &bars[..390];
        assert_eq!(daily[0].t, ny("2024-03-04", "09:30"));
        assert_eq!(daily[0].o, day0[0].o);
        assert_eq!(daily[0].c, day0[389].c);
        assert_eq!(daily[0].v, day0.iter().map(|b| b.v).sum::<u64>());
        assert_eq!(
            daily[0].h,
            day0.iter().map(|b| b.h).fold(f64::MIN, f64::max)
        );
        // 09:30, 10:30, …, 15:30: 7 buckets a day, the last one 30 minutes.
        let hourly = resample(&bars, Interval::H1).bars;
        assert_eq!(hourly.len(), 35);
        assert_eq!(hourly[0].t, ny("2024-03-04", "09:30"));
        assert_eq!(hourly[6].t, ny("2024-03-04", "15:30"));
        assert_eq!(hourly[6].v, day0[360..].iter().map(|b| b.v).sum::<u64>());
        assert_eq!(resample(&bars, Interval::M15).bars.len(), 5 * 26);
        assert_eq!(resample(&bars, Interval::M30).bars.len(), 5 * 13);
        assert_eq!(resample(&bars, Interval::M1).bars, bars);
    }

    /// Extended-hours bars never reach a regular bucket: each interval's
    /// bars equal those of the session-only input, and every label is a
    /// bucket start inside a session.
    #[test]
    fn extended_hours_never_reach_a_regular_bucket() {
        let all = extended_day_bars("2024-03-04", "2024-03-08");
        let regular: Vec<Bar> = all
            .iter()
            .filter(|b| {
                calendar::session(calendar::ny_date(b.t)).is_some_and(|(o, c)| o <= b.t && b.t < c)
            })
            .copied()
            .collect();
        assert_eq!(regular.len(), 5 * 390);
        for interval in Interval::ALL {
            let r = resample(&all, interval);
            assert_eq!(r.extended, all.len() - regular.len(), "{interval}");
            assert_eq!(r.bars, resample(&regular, interval).bars, "{interval}");
            for b in &r.bars {
                let (open, close) = calendar::session(calendar::ny_date(b.t)).unwrap();
                assert!(open <= b.t && b.t < close, "{interval}: {b:?}");
                let since = (b.t - open).num_minutes();
                match interval.minutes() {
                    Some(m) => assert_eq!(since % m, 0, "{interval}: {b:?}"),
                    None => assert_eq!(since, 0, "{interval}: {b:?}"),
                }
            }
        }
        // The first 1h bar of a day covers 09:30–10:29 only.
        let h = resample(&all, Interval::H1).bars;
        let day = &regular[..60];
        assert_eq!(h[0].o, day[0].o);
        assert_eq!(h[0].c, day[59].c);
        assert_eq!(h[0].v, day.iter().map(|b| b.v).sum::<u64>());
        let pv: f64 = day.iter().map(|b| b.vw * b.v as f64).sum();
        assert!((h[0].vw - pv / h[0].v as f64).abs() < 1e-9);
    }

    /// 2024-11-29 closes at 13:00: hourly buckets 09:30, 10:30, 11:30 and a
    /// 30-minute 12:30; the daily bar ends with the 12:59 close.
    #[test]
    fn a_half_day() {
        let all = extended_day_bars("2024-11-29", "2024-11-29");
        let h = resample(&all, Interval::H1).bars;
        let labels: Vec<DateTime<Utc>> = h.iter().map(|b| b.t).collect();
        assert_eq!(
            labels,
            ["09:30", "10:30", "11:30", "12:30"]
                .map(|t| ny("2024-11-29", t))
                .to_vec()
        );
        let last_regular = all
            .iter()
            .rfind(|b| b.t < ny("2024-11-29", "13:00"))
            .unwrap();
        assert_eq!(h[3].c, last_regular.c);
        let day = resample(&all, Interval::D1).bars;
        assert_eq!(day.len(), 1);
        assert_eq!(day[0].t, ny("2024-11-29", "09:30"));
        assert_eq!(day[0].c, last_regular.c);
        assert_eq!(resample(&all, Interval::M1).bars.len(), 210);
    }

    /// Across the March 2024 change to daylight time the buckets stay on
    /// the New York clock: 09:30 is 14:30 UTC on Friday and 13:30 UTC on Monday.
    #[test]
    fn across_a_dst_change() {
        let all = extended_day_bars("2024-03-08", "2024-03-11");
        let h = resample(&all, Interval::H1).bars;
        assert_eq!(h.len(), 14);
        assert_eq!(h[0].t.to_rfc3339(), "2024-03-08T14:30:00+00:00");
        assert_eq!(h[7].t.to_rfc3339(), "2024-03-11T13:30:00+00:00");
        let days = resample(&all, Interval::D1).bars;
        assert_eq!(
            days.iter().map(|b| b.t.to_rfc3339()).collect::<Vec<_>>(),
            ["2024-03-08T14:30:00+00:00", "2024-03-11T13:30:00+00:00"]
        );
    }

    /// Bars on 2012-10-29/30 (the exchange closed for Hurricane Sandy) are
    /// left out like extended hours.
    #[test]
    fn hurricane_sandy_days_make_no_bars() {
        let all = extended_day_bars("2012-10-26", "2012-10-31");
        let days = resample(&all, Interval::D1);
        assert_eq!(
            days.bars
                .iter()
                .map(|b| calendar::ny_date(b.t).to_string())
                .collect::<Vec<_>>(),
            ["2012-10-26", "2012-10-31"]
        );
        assert_eq!(days.extended, all.len() - 2 * 390);
    }
}
