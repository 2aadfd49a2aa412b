//! The poison test of the three sources on Kafka (the real broker
//! `scripts/services.sh up` starts) and the object store (s3s-fs): 1,600
//! good messages with 1% poison of every kind among them — bad JSON, a
//! missing field, a wrong type, a non-finite, zero or negative price,
//! high < low, a negative volume, a timestamp off the session calendar, a
//! payload over `ingest.max_message_bytes`, a panic while a record is
//! processed, and the macro and company contracts' own violations.
//!
//! - The dead-letter topics hold exactly those, each with its headers.
//! - Every good row is in the store, read back (no good row lost), and
//!   every offset is committed (the consumers never stalled).
//! - After a fix (the panicking code path gone, the payload limit raised)
//!   `dlq replay` lands the two fixable ones; the still-bad ones are
//!   dead-lettered again and listed for the next replay.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use chrono::{Datelike, NaiveDate};
use common::*;
use tickmesh_core::calendar::is_trading_day;
use tickmesh_core::config::Role;
use tickmesh_core::types::topics;
use tickmesh_ingest::dlq;
use tickmesh_io::parquet_io::{decode_bars, decode_fundamentals, decode_macro};
use tickmesh_io::store::buckets;

/// The payload limit before the fix.
const LIMIT: usize = 64 * 1024;
/// The key whose processing panics before the fix (a failpoint).
const PANICS: &str = "FIXD";

/// A bars message of one bar per trading day of the ISO week of `monday`.
fn week_message(ticker: &str, monday: NaiveDate) -> (Vec<u8>, Vec<(String, i64)>) {
    let mut bars = Vec::new();
    let mut rows = Vec::new();
    for d in 0..5 {
        let day = monday + chrono::Duration::days(d);
        if !is_trading_day(day) {
            continue;
        }
        let t = format!("{day}T14:30:00Z");
        let p = 100.0 + d as f64 + monday.ordinal() as f64 / 10.0;
        bars.push(format!(
            r#"{{"t":"{t}","o":{p},"h":{},"l":{},"c":{p},"v":{}}}"#,
            p + 1.0,
            p - 1.0,
            1000 + d
        ));
        let ts: chrono::DateTime<chrono::Utc> = t.parse().unwrap();
        rows.push((ticker.to_string(), ts.timestamp_micros()));
    }
    let json = format!(r#"{{"ticker":"{ticker}","bars":[{}]}}"#, bars.join(","));
    (json.into_bytes(), rows)
}

/// The poison of each topic: (key, payload, a part of the reason).
fn poison() -> Vec<(&'static str, String, Vec<u8>, &'static str)> {
    let bar = |fields: &str| format!(r#"{{"ticker":"G00","bars":[{{{fields}}}]}}"#);
    let ok = r#""t":"2024-01-08T14:30:00Z","o":1,"h":2,"l":1,"c":1,"v":1"#;
    let mut huge = format!(r#"{{"ticker":"BIGM","bars":[{{{ok}}}]}}"#).into_bytes();
    huge.resize(LIMIT + 10, b' ');
    let mut out: Vec<(&'static str, String, Vec<u8>, &'static str)> = vec![
        (
            topics::BARS,
            "G00".into(),
            br#"{"ticker":"G00","bars":["#.to_vec(),
            "EOF",
        ),
        (
            topics::BARS,
            "G00".into(),
            bar(r#""t":"2024-01-08T14:30:00Z","o":1,"h":2,"l":1,"v":1"#).into_bytes(),
            "missing field `c`",
        ),
        (
            topics::BARS,
            "G00".into(),
            bar(r#""t":"2024-01-08T14:30:00Z","o":"abc","h":2,"l":1,"c":1,"v":1"#).into_bytes(),
            "bars[0].o",
        ),
        (
            topics::BARS,
            "G00".into(),
            bar(r#""t":"2024-01-08T14:30:00Z","o":1,"h":1e999,"l":1,"c":1,"v":1"#).into_bytes(),
            "bars[0].h",
        ),
        (
            topics::BARS,
            "G00".into(),
            bar(r#""t":"2024-01-08T14:30:00Z","o":0,"h":2,"l":1,"c":1,"v":1"#).into_bytes(),
            "finite positive price",
        ),
        (
            topics::BARS,
            "G00".into(),
            bar(r#""t":"2024-01-08T14:30:00Z","o":1,"h":2,"l":-1,"c":1,"v":1"#).into_bytes(),
            "finite positive price",
        ),
        (
            topics::BARS,
            "G00".into(),
            bar(r#""t":"2024-01-08T14:30:00Z","o":1,"h":1,"l":2,"c":1,"v":1"#).into_bytes(),
            "below low",
        ),
        (
            topics::BARS,
            "G00".into(),
            bar(r#""t":"2024-01-08T14:30:00Z","o":1,"h":2,"l":1,"c":1,"v":-5"#).into_bytes(),
            "bars[0].v",
        ),
        (
            topics::BARS,
            "G00".into(),
            bar(r#""t":"2024-01-13T14:30:00Z","o":1,"h":2,"l":1,"c":1,"v":1"#).into_bytes(),
            "not an NYSE trading day",
        ),
        (
            topics::BARS,
            "BIGM".into(),
            huge,
            "exceeds ingest.max_message_bytes = 65536",
        ),
        (
            topics::MACRO,
            "M0".into(),
            br#"{"series":"M0","observations":[{"date":"2015-01-01"}]}"#.to_vec(),
            "missing field `value`",
        ),
        (
            topics::MACRO,
            "M0".into(),
            br#"{"series":"M0","observations":[{"date":"2015-01-01","value":"1.5"}]}"#.to_vec(),
            "observations[0].value",
        ),
        (
            topics::MACRO,
            "M0".into(),
            br#"{"series":"M0","observations":[{"date":"1700-01-01","value":1.5}]}"#.to_vec(),
            "outside",
        ),
        (
            topics::COMPANY,
            "C00".into(),
            br#"{"symbol":"C00","calendarYear":2015,"revenue":-1}"#.to_vec(),
            "revenue = -1",
        ),
        (
            topics::COMPANY,
            "C00".into(),
            br#"{"symbol":"C00","calendarYear":2015,"eps":"high"}"#.to_vec(),
            "eps",
        ),
        (
            topics::COMPANY,
            "C00".into(),
            br#"{"symbol":"C00","revenue":1}"#.to_vec(),
            "calendarYear",
        ),
    ];
    let monday: NaiveDate = "2024-01-08".parse().unwrap();
    out.push((
        topics::BARS,
        PANICS.into(),
        week_message(PANICS, monday).0,
        "panicked",
    ));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_percent_poison_of_every_kind_is_dead_lettered_and_replayed_after_a_fix() {
    // This file's only test: no other thread reads the environment.
    unsafe { std::env::set_var("TICKMESH_FAILPOINT_PANIC_KEY", PANICS) };
    let (mut cfg, a) = distributed("dlqreplay").await;
    cfg.ingest.max_message_bytes = LIMIT;
    cfg.ingest.batch_records = 64;
    let node = start(&cfg, &a, &[Role::Ingest]).await;

    // The good messages: 1,400 ticker-weeks, 100 series-years, 100 symbol-years.
    let mut good: Vec<(&str, String, Vec<u8>)> = Vec::new();
    let mut bar_rows = BTreeSet::new();
    let first: NaiveDate = "2023-01-02".parse().unwrap();
    for t in 0..35 {
        for w in 0..40 {
            let ticker = format!("G{t:02}");
            let (payload, rows) = week_message(&ticker, first + chrono::Duration::weeks(w));
            bar_rows.extend(rows);
            good.push((topics::BARS, ticker, payload));
        }
    }
    let mut macro_rows = BTreeSet::new();
    let mut company_rows = BTreeSet::new();
    for s in 0..10 {
        for year in 2010..2020 {
            let series = format!("M{s}");
            let obs: Vec<String> = (1..=12)
                .map(|m| {
                    macro_rows.insert((series.clone(), format!("{year}-{m:02}-01")));
                    format!(
                        r#"{{"date":"{year}-{m:02}-01","value":{}.{m}}}"#,
                        s * 100 + year
                    )
                })
                .collect();
            let msg = format!(
                r#"{{"series":"{series}","observations":[{}]}}"#,
                obs.join(",")
            );
            good.push((topics::MACRO, series, msg.into_bytes()));
            let symbol = format!("C{s:02}");
            company_rows.insert((symbol.clone(), year));
            let msg = format!(
                r#"{{"symbol":"{symbol}","calendarYear":"{year}","revenue":{},"eps":1.5,"fillingDate":"{}-02-01"}}"#,
                1e9 + year as f64,
                year + 1
            );
            good.push((topics::COMPANY, symbol, msg.into_bytes()));
        }
    }
    let poison = poison();
    assert_eq!(good.len(), 1600);
    assert_eq!(poison.len() * 100, good.len() + 100, "1% poison");
    // Interleave: one poison message after every 100 good ones.
    let mut sent = 0usize;
    let mut bad = poison.iter();
    for (i, (topic, key, payload)) in good.iter().enumerate() {
        a.publisher.publish(topic, key, payload, &[]).await.unwrap();
        sent += 1;
        if i % 100 == 50 {
            let (topic, key, payload, _) = bad.next().unwrap();
            a.publisher.publish(topic, key, payload, &[]).await.unwrap();
            sent += 1;
        }
    }
    for (topic, key, payload, _) in bad {
        a.publisher.publish(topic, key, payload, &[]).await.unwrap();
        sent += 1;
    }
    assert_eq!(sent, 1617);

    let m = node.ingest_metrics.clone();
    eventually(
        "1,600 good messages written and 17 dead-lettered",
        Duration::from_secs(120),
        || {
            let m = m.clone();
            async move { m.messages() == 1600 && m.dead_lettered() == 17 }
        },
    )
    .await;
    // The same counts on /metrics, per source, through the metrics library.
    let text = tickmesh_io::telemetry::render();
    let value = |line_start: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no `{line_start}` in /metrics:\n{text}"))
    };
    let per_source: BTreeMap<&str, f64> = ["bars", "macro", "company"]
        .into_iter()
        .map(|s| {
            (
                s,
                value(&format!(
                    "tickmesh_ingest_dead_letters_total{{source=\"{s}\"}}"
                )),
            )
        })
        .collect();
    assert_eq!(per_source.values().sum::<f64>(), 17.0, "{per_source:?}");
    for s in ["bars", "macro", "company"] {
        assert!(value(&format!("tickmesh_ingest_records_total{{source=\"{s}\"}}")) > 0.0);
    }
    assert!(
        text.contains("# TYPE tickmesh_ingest_dead_letters_total counter"),
        "{text}"
    );
    assert!(
        text.contains("# HELP tickmesh_ingest_dead_letters_total "),
        "{text}"
    );
    node.stop().await;

    // The dead-letter topics hold exactly the poison, each with its headers.
    for topic in [topics::BARS, topics::MACRO, topics::COMPANY] {
        let letters = dlq::list(&a.bus, topic, true).await.unwrap();
        let expected: Vec<_> = poison.iter().filter(|p| p.0 == topic).collect();
        assert_eq!(letters.len(), expected.len(), "{topic}: {letters:#?}");
        let mut by_payload: HashMap<&[u8], &dlq::DeadLetter> =
            letters.iter().map(|d| (d.payload.as_slice(), d)).collect();
        for (_, key, payload, why) in expected {
            let d = by_payload
                .remove(payload.as_slice())
                .unwrap_or_else(|| panic!("{topic}: no dead letter for {why}"));
            assert_eq!(d.source_topic, topic);
            assert_eq!(d.key.as_deref(), Some(key.as_str()));
            assert!(
                d.source_partition.is_some() && d.source_offset.is_some(),
                "{d:?}"
            );
            assert!(d.dead_lettered_at.is_some(), "{d:?}");
            assert!(
                d.error.contains(why),
                "{topic}: `{}` should name `{why}`",
                d.error
            );
        }
    }

    // No good row lost: read every object back.
    let mut stored_bars = BTreeSet::new();
    for key in a.store.list(buckets::STOCK_DATA, "").await.unwrap() {
        let data = a
            .store
            .get(buckets::STOCK_DATA, &key)
            .await
            .unwrap()
            .unwrap();
        let ticker = key.split('/').next().unwrap().to_string();
        for b in decode_bars(data, &key).unwrap() {
            assert!(
                stored_bars.insert((ticker.clone(), b.t.timestamp_micros())),
                "duplicate in {key}"
            );
        }
    }
    assert_eq!(stored_bars, bar_rows, "bars rows");
    let mut stored_macro = BTreeSet::new();
    for key in a.store.list(buckets::MACRO_DATA, "").await.unwrap() {
        let data = a
            .store
            .get(buckets::MACRO_DATA, &key)
            .await
            .unwrap()
            .unwrap();
        let series = key.split('/').next().unwrap().to_string();
        for o in decode_macro(data, &key).unwrap() {
            stored_macro.insert((series.clone(), o.date.to_string()));
        }
    }
    assert_eq!(stored_macro, macro_rows, "macro rows");
    let mut stored_company = BTreeSet::new();
    for key in a.store.list(buckets::COMPANY, "").await.unwrap() {
        let data = a.store.get(buckets::COMPANY, &key).await.unwrap().unwrap();
        for r in decode_fundamentals(data, &key).unwrap() {
            stored_company.insert((r.symbol.clone(), r.calendar_year));
        }
    }
    assert_eq!(stored_company, company_rows, "company rows");

    // Every offset was committed: the group has nothing left to read.
    for topic in [topics::BARS, topics::MACRO, topics::COMPANY] {
        let mut again = a.bus.subscribe(topic, "ingest").await.unwrap();
        assert!(
            again.poll(Duration::from_secs(5)).await.unwrap().is_none(),
            "{topic}: offsets were not committed"
        );
    }

    // The fix: the panicking path is gone and the limit raised.
    unsafe { std::env::remove_var("TICKMESH_FAILPOINT_PANIC_KEY") };
    cfg.ingest.max_message_bytes = 1024 * 1024;
    let node = start(&cfg, &a, &[Role::Ingest]).await;
    let mut replayed = 0;
    for topic in [topics::BARS, topics::MACRO, topics::COMPANY] {
        let r = dlq::replay(&a.bus, a.publisher.as_ref(), topic)
            .await
            .unwrap();
        assert_eq!(r.not_replayable, 0);
        replayed += r.replayed;
    }
    assert_eq!(replayed, 17);
    let m = node.ingest_metrics.clone();
    eventually(
        "the 2 fixed messages written, the 15 still bad dead-lettered again",
        Duration::from_secs(60),
        || {
            let m = m.clone();
            async move { m.messages() == 2 && m.dead_lettered() == 15 }
        },
    )
    .await;
    node.stop().await;
    for ticker in [PANICS, "BIGM"] {
        let keys = a
            .store
            .list(buckets::STOCK_DATA, &format!("{ticker}/"))
            .await
            .unwrap();
        assert_eq!(
            keys,
            vec![format!("{ticker}/2024/01/{ticker}_2024-W02.parquet")]
        );
    }
    // What a replay would take now: exactly the 15 still bad, dead-lettered
    // again, not the ones already replayed.
    let mut pending = 0;
    for topic in [topics::BARS, topics::MACRO, topics::COMPANY] {
        let letters = dlq::list(&a.bus, topic, false).await.unwrap();
        for d in &letters {
            assert!(
                !d.error.contains("panicked") && !d.error.contains("max_message_bytes"),
                "{d:?}"
            );
        }
        pending += letters.len();
    }
    assert_eq!(pending, 15);
}
