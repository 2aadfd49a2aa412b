//! The aggregate role's joins and loads, through the store and the
//! database: SQLite (embedded) for the joins, PostgreSQL
//! (`scripts/services.sh up`) for the loads.

mod common;

use std::collections::BTreeMap;

use chrono::{Datelike, Months, NaiveDate};
use common::*;
use tickmesh_aggregate::aggregator;
use tickmesh_core::calendar;
use tickmesh_core::types::{
    bars_object_key, company_object_key, macro_object_key, AggRow, Fundamentals, Interval, IsoWeek,
    Observation,
};
use tickmesh_io::db::Db;
use tickmesh_io::parquet_io::{encode_bars, encode_fundamentals, encode_macro};
use tickmesh_io::store::buckets;
use tickmesh_io::Adapters;

fn d(s: &str) -> NaiveDate {
    s.parse().unwrap()
}

async fn put_macro(a: &Adapters, series: &str, obs: &[Observation]) {
    let mut years: BTreeMap<i32, Vec<Observation>> = BTreeMap::new();
    for o in obs {
        years.entry(o.date.year()).or_default().push(*o);
    }
    for (y, o) in years {
        a.store
            .put(
                buckets::MACRO_DATA,
                &macro_object_key(series, y),
                encode_macro(series, &o).unwrap(),
            )
            .await
            .unwrap();
    }
}

async fn put_fundamentals(a: &Adapters, rows: &[Fundamentals]) {
    for r in rows {
        a.store
            .put(
                buckets::COMPANY,
                &company_object_key(&r.symbol, r.calendar_year),
                encode_fundamentals(std::slice::from_ref(r)).unwrap(),
            )
            .await
            .unwrap();
    }
}

/// Observations on the first day of each `step`-month period, 2019 .. 2022.
fn series(step: u32, base: f64) -> Vec<Observation> {
    let mut out = Vec::new();
    let mut date = d("2019-01-01");
    while date.year() <= 2022 {
        out.push(Observation {
            date,
            value: base + out.len() as f64,
        });
        date = date + Months::new(step);
    }
    out
}

async fn rows(a: &Adapters, ticker: &str, interval: Interval, columns: &[String]) -> Vec<AggRow> {
    a.db.read_aggregated(ticker, interval, columns, None)
        .await
        .unwrap()
}

/// A value joins a bar from the day it was published (the real filing
/// dates of Apple's 10-Ks; a release lag per macro series), and changing
/// any value dated or published after a day never changes a row of that day
/// or before, at a daily and an intraday interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joined_rows_never_see_values_published_after_them() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, a) = embedded(dir.path()).await;
    store_synthetic(&a, "AAPL", "2020-09-01", "2021-12-31").await;
    let sample =
        tickmesh_ingest::producer::read_fundamentals(&repo().join("data/sample/fundamentals.csv"))
            .unwrap();
    let mut company: Vec<Fundamentals> =
        sample.into_iter().filter(|r| r.symbol == "AAPL").collect();
    put_fundamentals(&a, &company).await;
    let (mut monthly, mut quarterly) = (series(1, 100.0), series(3, 500.0));
    put_macro(&a, "TESTM", &monthly).await;
    put_macro(&a, "TESTQ", &quarterly).await;

    let mut args = aggregator_args(&a);
    args.joins.macro_lags = [("TESTM".to_string(), 40), ("TESTQ".to_string(), 120)].into();
    let mut columns = cfg.features.columns();
    columns.extend(args.joins.columns());
    let col = |name: &str| columns.iter().position(|c| c == name).unwrap();
    let intervals = [Interval::D1, Interval::M30];
    let mut before = Vec::new();
    for interval in intervals {
        aggregator::run(&args, &["AAPL".into()], interval)
            .await
            .unwrap();
        before.push(rows(&a, "AAPL", interval, &columns).await);
    }
    let daily = &before[0];
    let on = |date: &str| {
        daily
            .iter()
            .find(|r| calendar::ny_date(r.ts) == d(date))
            .unwrap_or_else(|| panic!("no daily row on {date}"))
    };
    // Apple's FY2020 10-K was filed on Friday 2020-10-30: FY2019's EPS
    // through that day (it may come after the close), FY2020's from Monday.
    assert_eq!(on("2020-10-30").values[col("fund_eps")], Some(11.89));
    assert_eq!(on("2020-11-02").values[col("fund_eps")], Some(3.28));
    assert_eq!(on("2021-10-29").values[col("fund_eps")], Some(3.28));
    assert_eq!(on("2021-11-01").values[col("fund_eps")], Some(5.61));
    assert_eq!(
        on("2021-11-01").values[col("fund_operating_cash_flow")],
        None
    );
    // TESTM (value 100 + months since 2019-01): 2021-02-01 + 40 days = 2021-03-13 (a Saturday).
    assert_eq!(on("2021-03-12").values[col("macro_testm")], Some(124.0));
    assert_eq!(on("2021-03-15").values[col("macro_testm")], Some(125.0));
    // TESTQ: 2020-10-01 + 120 days = 2021-01-29.
    assert_eq!(on("2021-01-28").values[col("macro_testq")], Some(506.0));
    assert_eq!(on("2021-01-29").values[col("macro_testq")], Some(507.0));

    // Everything dated or published after the cutoff changes.
    let cutoff = d("2021-06-15");
    for (obs, lag) in [(&mut monthly, 40), (&mut quarterly, 120)] {
        for o in obs.iter_mut() {
            if o.date + chrono::Days::new(lag) > cutoff {
                o.value += 1000.0;
            }
        }
    }
    put_macro(&a, "TESTM", &monthly).await;
    put_macro(&a, "TESTQ", &quarterly).await;
    for r in company.iter_mut() {
        // Public the day after the filing.
        if r.filling_date.unwrap() >= cutoff {
            r.eps = r.eps.map(|e| e * 10.0);
            r.revenue = None;
        }
    }
    put_fundamentals(&a, &company).await;
    for (interval, old) in intervals.into_iter().zip(&before) {
        aggregator::run(&args, &["AAPL".into()], interval)
            .await
            .unwrap();
        let new = rows(&a, "AAPL", interval, &columns).await;
        assert_eq!(new.len(), old.len(), "{interval}");
        for (o, n) in old.iter().zip(&new) {
            assert_eq!(o.ts, n.ts);
            let date = calendar::ny_date(o.ts);
            if date <= cutoff {
                assert_eq!(o, n, "{interval}: the row at {} changed", o.ts);
            } else if date >= d("2021-07-11") {
                // TESTM's June value (public on 2021-07-11) and everything
                // after it changed.
                assert_ne!(o, n, "{interval}: the row at {} did not change", o.ts);
            }
        }
    }
    let daily = rows(&a, "AAPL", Interval::D1, &columns).await;
    let eps = |date: &str| {
        daily
            .iter()
            .find(|r| calendar::ny_date(r.ts) == d(date))
            .unwrap()
            .values[col("fund_eps")]
    };
    assert_eq!(eps("2021-10-29"), Some(3.28));
    assert_eq!(eps("2021-11-01"), Some(56.1));

    // A configured series with nothing stored is an error naming it.
    args.joins.macro_lags.insert("NOSUCH".into(), 30);
    let e = aggregator::run(&args, &["AAPL".into()], Interval::D1)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("NOSUCH") && e.contains("macro-data/NOSUCH/"),
        "{e}"
    );
}

/// `xmin` of every row of a series: the transaction that last wrote it.
async fn xmins(a: &Adapters, ticker: &str) -> Vec<(String, i64)> {
    let Db::Postgres(pool) = &a.db else {
        panic!("PostgreSQL expected")
    };
    sqlx::query_as(
        "SELECT ts::text, xmin::text::bigint FROM aggregated_data WHERE ticker = $1 AND \"interval\" = '15m' ORDER BY ts",
    )
    .bind(ticker)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// PostgreSQL: a run loads each ticker's series in one transaction (binary
/// COPY, upsert), several tickers at once; a replay rewrites no row (the
/// rows keep the transaction id that wrote them) and announces nothing; a
/// run on less data replaces the series, deleting the rows it no longer has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loads_replace_the_series_and_a_replay_writes_nothing() {
    let (cfg, a) = distributed("aggload").await;
    let tickers: Vec<String> = ["TSLA1", "TSLA2", "TSLA3"].map(String::from).to_vec();
    let mut bars = Vec::new();
    for t in &tickers {
        bars.push(store_synthetic(&a, t, "2024-03-04", "2024-03-15").await);
    }
    let args = aggregator_args(&a);
    let report = aggregator::run(&args, &tickers, Interval::M15)
        .await
        .unwrap();
    for t in &tickers {
        assert_eq!(report.rows[t], 10 * 26, "{t}");
    }
    let columns = cfg.features.columns();
    let first = rows(&a, "TSLA1", Interval::M15, &columns).await;
    let written = xmins(&a, "TSLA1").await;
    assert_eq!(written.len(), 260);

    let replay = aggregator::run(&args, &tickers, Interval::M15)
        .await
        .unwrap();
    assert!(replay.changed.is_empty(), "{replay:?}");
    assert_eq!(xmins(&a, "TSLA1").await, written, "a replay rewrote rows");
    assert_eq!(rows(&a, "TSLA1", Interval::M15, &columns).await, first);

    // The second week loses its Wednesday: those rows go, and the rows
    // before it stay as they were.
    let wednesday = d("2024-03-13");
    let kept: Vec<_> = bars[0]
        .iter()
        .filter(|b| IsoWeek::of(b.t) == IsoWeek::of(bars[0].last().unwrap().t))
        .filter(|b| calendar::ny_date(b.t) != wednesday)
        .copied()
        .collect();
    let week = IsoWeek::of(kept[0].t);
    a.store
        .put(
            buckets::STOCK_DATA,
            &bars_object_key("TSLA1", week),
            encode_bars("TSLA1", &kept).unwrap(),
        )
        .await
        .unwrap();
    let report = aggregator::run(&args, &tickers, Interval::M15)
        .await
        .unwrap();
    assert_eq!(report.rows["TSLA1"], 9 * 26);
    // Only TSLA1 changed, and only it is announced.
    assert_eq!(report.changed, vec!["TSLA1".to_string()]);
    let now = rows(&a, "TSLA1", Interval::M15, &columns).await;
    assert_eq!(now.len(), 9 * 26);
    assert!(now.iter().all(|r| calendar::ny_date(r.ts) != wednesday));
    assert_eq!(now[..7 * 26], first[..7 * 26]);
    assert_eq!(
        rows(&a, "TSLA2", Interval::M15, &columns).await.len(),
        10 * 26
    );
}
