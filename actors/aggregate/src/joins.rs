//! As-of joins of macro series and company fundamentals onto bars, without
//! look-ahead (`[joins]` in cluster.toml; docs/aggregation.md, "Joins").
//!
//! A bar's date is its New York calendar date (for a daily bar, the trading
//! day). A value joins a bar only once it was public on that date:
//!
//! - **Macro**: FRED dates an observation by the first day of the period it
//!   measures, not by the day it was released. An observation dated D counts
//!   as published on D + lag, the series' release lag from `[joins] macro`
//!   (period length plus the agency's delay). A bar gets the latest
//!   observation published on or before its date, or NULL before the first.
//! - **Fundamentals**: a bar gets the row of the latest fiscal year that
//!   ended before its date and whose 10-K was filed before it (the day
//!   after the filing date: filings come at any time of day, often after
//!   the close). A row without a filing date counts as public
//!   `fundamentals_lag_days` after its fiscal-year end (31 December of
//!   `calendarYear` when the end is unknown too). A metric the chosen row
//!   lacks is NULL, never an older year's.
//!
//! Values are the ones stored (the latest delivery of each observation or
//! fiscal year); earlier vintages of revised series are not kept.

use chrono::{DateTime, Days, NaiveDate, Utc};
use tickmesh_core::calendar;
use tickmesh_core::config::JoinConfig;
use tickmesh_core::types::{AggRow, Fundamentals, Observation};

/// One macro series, ready to join: `(published, value)` in publication order.
#[derive(Debug, Clone, PartialEq)]
pub struct MacroSeries {
    pub series: String,
    published: Vec<(NaiveDate, f64)>,
}

impl MacroSeries {
    /// `obs` in date order (as `merge_macro` returns them).
    pub fn new(series: &str, lag_days: u32, obs: &[Observation]) -> Self {
        let published = obs
            .iter()
            .map(|o| (published_after(o.date, lag_days), o.value))
            .collect();
        MacroSeries {
            series: series.to_string(),
            published,
        }
    }

    /// How many observations it holds.
    pub fn len(&self) -> usize {
        self.published.len()
    }

    pub fn is_empty(&self) -> bool {
        self.published.is_empty()
    }
}

fn published_after(d: NaiveDate, days: u32) -> NaiveDate {
    d.checked_add_days(Days::new(days.into()))
        .unwrap_or(NaiveDate::MAX)
}

/// One fiscal year of a company, ready to join.
#[derive(Debug, Clone, PartialEq)]
pub struct FiscalYear {
    /// The end of the fiscal year.
    pub period_end: NaiveDate,
    /// The first day a bar may see it.
    pub public: NaiveDate,
    /// Every metric, in `FUNDAMENTAL_COLUMNS` order.
    pub metrics: [Option<f64>; 8],
}

/// A company's fiscal years in the order they became public.
pub fn fiscal_years(rows: &[Fundamentals], lag_days: u32) -> Vec<FiscalYear> {
    let mut out: Vec<FiscalYear> = rows
        .iter()
        .map(|r| {
            let period_end = r.period_end.unwrap_or_else(|| {
                NaiveDate::from_ymd_opt(r.calendar_year, 12, 31).unwrap_or(NaiveDate::MAX)
            });
            // A filing's time of day is unknown (10-Ks are often filed
            // after the close): public from the day after it. Never before
            // the day after the year ended, whatever a filing date says.
            let earliest = published_after(period_end, 1);
            let public = r
                .filling_date
                .map(|f| published_after(f, 1))
                .unwrap_or_else(|| published_after(period_end, lag_days))
                .max(earliest);
            FiscalYear {
                period_end,
                public,
                metrics: r.metrics(),
            }
        })
        .collect();
    out.sort_by_key(|f| (f.public, f.period_end));
    out
}

/// What is joined onto one ticker's bars.
pub struct Joins<'a> {
    pub macros: &'a [MacroSeries],
    pub fundamentals: &'a [FiscalYear],
    /// The joined metrics' indices in `FUNDAMENTAL_COLUMNS`.
    pub metrics: &'a [usize],
}

impl Joins<'_> {
    /// How many values each row gains.
    pub fn width(&self) -> usize {
        self.macros.len() + self.metrics.len()
    }

    /// Appends the joined values to each row, in [`JoinConfig::columns`]
    /// order (the macros sorted by series, as the config's map is); the
    /// rows are in time order.
    pub fn apply(&self, rows: &mut [AggRow]) {
        let mut macro_next = vec![0usize; self.macros.len()];
        let mut fund_next = 0usize;
        let mut best: Option<&FiscalYear> = None;
        let mut days = DayCursor::default();
        for AggRow { ts, values: row } in rows.iter_mut() {
            let date = days.date(*ts);
            row.reserve(self.width());
            for (m, next) in self.macros.iter().zip(macro_next.iter_mut()) {
                while *next < m.published.len() && m.published[*next].0 <= date {
                    *next += 1;
                }
                row.push(next.checked_sub(1).map(|i| m.published[i].1));
            }
            while fund_next < self.fundamentals.len() && self.fundamentals[fund_next].public <= date
            {
                let f = &self.fundamentals[fund_next];
                if best.is_none_or(|b| f.period_end >= b.period_end) {
                    best = Some(f);
                }
                fund_next += 1;
            }
            row.extend(
                self.metrics
                    .iter()
                    .map(|&i| best.and_then(|f| f.metrics[i])),
            );
        }
    }
}

/// The New York date of ascending times, converting only when a time
/// crosses into a new UTC day or past the cached New York midnight.
#[derive(Default)]
struct DayCursor {
    /// The date, valid for times in `[from, until)`.
    cached: Option<(DateTime<Utc>, DateTime<Utc>, NaiveDate)>,
}

impl DayCursor {
    fn date(&mut self, t: DateTime<Utc>) -> NaiveDate {
        if let Some((from, until, d)) = self.cached {
            if from <= t && t < until {
                return d;
            }
        }
        let d = calendar::ny_date(t);
        let midnight = |d: NaiveDate| calendar::ny_midnight(d);
        let from = midnight(d);
        let until = midnight(d.succ_opt().unwrap_or(NaiveDate::MAX));
        self.cached = Some((from, until, d));
        d
    }
}

/// The macro series `cfg` names, with their lags, from stored observations.
pub fn macro_series(cfg: &JoinConfig, stored: Vec<(String, Vec<Observation>)>) -> Vec<MacroSeries> {
    stored
        .iter()
        .map(|(s, obs)| MacroSeries::new(s, cfg.macro_lags[s], obs))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use tickmesh_core::config::FUNDAMENTAL_COLUMNS;

    fn d(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    /// The joined values of rows at `times`.
    fn joined(j: &Joins, times: &[DateTime<Utc>]) -> Vec<Vec<Option<f64>>> {
        let mut rows: Vec<AggRow> = times
            .iter()
            .map(|&ts| AggRow {
                ts,
                values: Vec::new(),
            })
            .collect();
        j.apply(&mut rows);
        rows.into_iter().map(|r| r.values).collect()
    }

    /// 15:00 New York on `d` (20:00 or 19:00 UTC).
    fn at(d: NaiveDate) -> DateTime<Utc> {
        calendar::ny_midnight(d) + chrono::Duration::hours(15)
    }

    fn fundamentals(year: i32, end: Option<&str>, filed: Option<&str>, eps: f64) -> Fundamentals {
        Fundamentals {
            symbol: "AAPL".into(),
            calendar_year: year,
            period_end: end.map(d),
            filling_date: filed.map(d),
            revenue: Some(eps * 1e9),
            net_income: None,
            eps: Some(eps),
            total_assets: None,
            total_liabilities: None,
            total_equity: None,
            operating_cash_flow: None,
            shares_outstanding: None,
        }
    }

    #[test]
    fn macro_values_join_once_published() {
        let obs = [
            Observation {
                date: d("2021-01-01"),
                value: 1.0,
            },
            Observation {
                date: d("2021-04-01"),
                value: 2.0,
            },
        ];
        let m = [MacroSeries::new("GDP", 120, &obs)];
        // 2021-01-01 + 120 days = 2021-05-01; 2021-04-01 + 120 = 2021-07-30.
        let dates = ["2021-04-30", "2021-05-01", "2021-07-29", "2021-07-30"];
        let times: Vec<_> = dates.iter().map(|s| at(d(s))).collect();
        let rows = joined(
            &Joins {
                macros: &m,
                fundamentals: &[],
                metrics: &[],
            },
            &times,
        );
        let got: Vec<Option<f64>> = rows.iter().map(|r| r[0]).collect();
        assert_eq!(got, [None, Some(1.0), Some(1.0), Some(2.0)]);
    }

    #[test]
    fn fundamentals_join_from_the_filing_of_the_latest_year() {
        let rows = [
            fundamentals(2020, Some("2020-09-26"), Some("2020-10-30"), 3.28),
            fundamentals(2021, Some("2021-09-25"), Some("2021-10-29"), 5.61),
            // No dates: 31 December + 90 days = 2023-03-31.
            fundamentals(2022, None, None, 6.0),
            // Filed "before" its year ended (bad data): public the day after.
            fundamentals(2023, Some("2023-09-30"), Some("2023-01-01"), 7.0),
        ];
        let years = fiscal_years(&rows, 90);
        let metrics = [2usize, 0];
        assert_eq!(FUNDAMENTAL_COLUMNS[2], "eps");
        // Filed 2020-10-30 and 2021-10-29: public the next day.
        let dates = [
            "2020-10-30",
            "2020-10-31",
            "2021-10-29",
            "2021-10-30",
            "2023-03-30",
            "2023-03-31",
            "2023-09-30",
            "2023-10-01",
        ];
        let times: Vec<_> = dates.iter().map(|s| at(d(s))).collect();
        let out = joined(
            &Joins {
                macros: &[],
                fundamentals: &years,
                metrics: &metrics,
            },
            &times,
        );
        let eps: Vec<Option<f64>> = out.iter().map(|r| r[0]).collect();
        assert_eq!(
            eps,
            [
                None,
                Some(3.28),
                Some(3.28),
                Some(5.61),
                Some(5.61),
                Some(6.0),
                Some(6.0),
                Some(7.0)
            ]
        );
        assert_eq!(out[1][1], Some(3.28e9));
    }

    #[test]
    fn a_late_filing_of_an_older_year_does_not_replace_a_newer_one() {
        // FY2021 is amended and stored with a filing date after FY2022's.
        let rows = [
            fundamentals(2021, Some("2021-12-31"), Some("2022-06-01"), 1.0),
            fundamentals(2022, Some("2022-12-31"), Some("2023-02-01"), 2.0),
            fundamentals(2020, Some("2020-12-31"), Some("2023-03-01"), 0.5),
        ];
        let years = fiscal_years(&rows, 90);
        let times = [at(d("2023-03-02"))];
        let out = joined(
            &Joins {
                macros: &[],
                fundamentals: &years,
                metrics: &[2],
            },
            &times,
        );
        assert_eq!(out[0], [Some(2.0)]);
    }

    #[test]
    fn the_date_is_new_york_s() {
        // 2021-03-01 23:30 New York is 2021-03-02 04:30 UTC.
        let t = calendar::ny_midnight(d("2021-03-01")) + chrono::Duration::minutes(23 * 60 + 30);
        let obs = [Observation {
            date: d("2021-03-02"),
            value: 1.0,
        }];
        let m = [MacroSeries::new("X", 0, &obs)];
        let out = joined(
            &Joins {
                macros: &m,
                fundamentals: &[],
                metrics: &[],
            },
            &[t, t + chrono::Duration::minutes(30)],
        );
        assert_eq!(out, [vec![None], vec![Some(1.0)]]);
    }

    /// Random bars, macro observations and fiscal years; then every value
    /// dated after a cutoff, or published after it, is changed (and some are
    /// added and some removed). No row on or before the cutoff changes, and
    /// the joined values equal a brute-force reading of the rules.
    #[test]
    fn no_look_ahead_on_random_data() {
        let mut rng = StdRng::seed_from_u64(7);
        let base = d("2015-01-01");
        for case in 0..200 {
            let day = |rng: &mut StdRng, span: u64| base + Days::new(rng.random_range(0..span));
            let mut dates: Vec<NaiveDate> = (0..rng.random_range(1..300))
                .map(|_| day(&mut rng, 3000))
                .collect();
            dates.sort();
            let mut times: Vec<DateTime<Utc>> = Vec::new();
            for dt in &dates {
                let t = calendar::ny_midnight(*dt)
                    + chrono::Duration::minutes(rng.random_range(0..24 * 60));
                if times.last().is_none_or(|l| *l < t) {
                    times.push(t);
                }
            }
            let lags: Vec<u32> = (0..3).map(|_| rng.random_range(0..200)).collect();
            let mut series: Vec<Vec<Observation>> = lags
                .iter()
                .map(|_| {
                    let mut o: Vec<Observation> = (0..rng.random_range(0..60))
                        .map(|_| Observation {
                            date: day(&mut rng, 3200),
                            value: rng.random(),
                        })
                        .collect();
                    o.sort_by_key(|o| o.date);
                    o.dedup_by_key(|o| o.date);
                    o
                })
                .collect();
            let fund_lag = rng.random_range(0..120);
            let years: Vec<i32> = (2014..2024).filter(|_| rng.random_bool(0.8)).collect();
            let mut company: Vec<Fundamentals> = years
                .into_iter()
                .map(|y| {
                    let end = NaiveDate::from_ymd_opt(y, rng.random_range(1..=12), 28).unwrap();
                    let filed = end + Days::new(rng.random_range(0..150));
                    let mut f = fundamentals(y, None, None, rng.random());
                    if rng.random_bool(0.7) {
                        f.period_end = Some(end);
                    }
                    if rng.random_bool(0.7) {
                        f.filling_date = Some(filed);
                    }
                    f
                })
                .collect();
            let metrics = [0usize, 2];
            let join = |series: &[Vec<Observation>], company: &[Fundamentals]| {
                let m: Vec<MacroSeries> = series
                    .iter()
                    .zip(&lags)
                    .map(|(o, &lag)| MacroSeries::new("S", lag, o))
                    .collect();
                let years = fiscal_years(company, fund_lag);
                let rows = joined(
                    &Joins {
                        macros: &m,
                        fundamentals: &years,
                        metrics: &metrics,
                    },
                    &times,
                );
                (rows, years)
            };
            let (before, _) = join(&series, &company);
            // Brute force: the rules read literally.
            for (t, row) in times.iter().zip(&before) {
                let date = calendar::ny_date(*t);
                for (k, (o, &lag)) in series.iter().zip(&lags).enumerate() {
                    let want = o
                        .iter()
                        .rev()
                        .find(|o| published_after(o.date, lag) <= date)
                        .map(|o| o.value);
                    assert_eq!(row[k], want, "case {case} series {k} at {date}");
                }
                // The rule read literally, from the rows themselves.
                let end_of = |f: &Fundamentals| {
                    f.period_end.unwrap_or_else(|| {
                        NaiveDate::from_ymd_opt(f.calendar_year, 12, 31).unwrap()
                    })
                };
                let public_of = |f: &Fundamentals| {
                    let public = match f.filling_date {
                        Some(filed) => filed + Days::new(1),
                        None => end_of(f) + Days::new(fund_lag as u64),
                    };
                    public.max(end_of(f) + Days::new(1))
                };
                let mut visible: Vec<&Fundamentals> = company
                    .iter()
                    .filter(|f| public_of(f) <= date && end_of(f) < date)
                    .collect();
                // Latest year; among equal ends the one public last.
                visible.sort_by_key(|f| (end_of(f), public_of(f)));
                assert_eq!(
                    row[3],
                    visible.last().and_then(|f| f.revenue),
                    "case {case} at {date}"
                );
            }
            // Change the future of the cutoff.
            let cutoff = day(&mut rng, 3000);
            for (o, &lag) in series.iter_mut().zip(&lags) {
                for x in o.iter_mut() {
                    if x.date > cutoff || published_after(x.date, lag) > cutoff {
                        x.value += 1.0;
                    }
                }
                o.push(Observation {
                    date: cutoff + Days::new(1),
                    value: -1.0,
                });
                o.sort_by_key(|o| o.date);
                o.dedup_by_key(|o| o.date);
            }
            let public =
                |f: &Fundamentals| fiscal_years(std::slice::from_ref(f), fund_lag)[0].public;
            company.retain(|f| public(f) <= cutoff || rng.random_bool(0.5));
            for f in company.iter_mut() {
                if public(f) > cutoff {
                    f.eps = Some(-5.0);
                    f.revenue = None;
                }
            }
            company.push(fundamentals(
                2024,
                None,
                Some(&(cutoff + Days::new(1)).to_string()),
                9.0,
            ));
            let (after, _) = join(&series, &company);
            for ((t, b), a) in times.iter().zip(&before).zip(&after) {
                if calendar::ny_date(*t) <= cutoff {
                    assert_eq!(
                        b, a,
                        "case {case}: the row at {t} changed (cutoff {cutoff})"
                    );
                }
            }
        }
    }
}
