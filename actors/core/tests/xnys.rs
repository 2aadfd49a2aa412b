//! The trading calendar against a published one: every weekday from 2000 to
//! 2026 trades in `tickmesh_core::calendar` exactly when the
//! `exchange-calendars` package's XNYS calendar has a session on it
//! (`scripts/py/xnys_reference.py`), and the early closes and their times
//! agree.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use chrono::{Datelike, NaiveDate, Weekday};
use chrono_tz::America::New_York;
use tickmesh_core::calendar;

fn python() -> String {
    let py = std::env::var("TICKMESH_PYTHON").unwrap_or_else(|_| "python".into());
    let ok = Command::new(&py)
        .args(["-c", "import exchange_calendars"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "`{py}` cannot import exchange_calendars: run scripts/setup.sh and `. scripts/env.sh` (scripts/test.sh does both)"
    );
    py
}

#[test]
fn every_weekday_2000_to_2026_matches_exchange_calendars() {
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/py/xnys_reference.py");
    let out = Command::new(python())
        .arg(script)
        .args(["2000", "2026"])
        .output()
        .expect("run xnys_reference.py");
    assert!(
        out.status.success(),
        "xnys_reference.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let closed: Vec<NaiveDate> = v["closed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().parse().unwrap())
        .collect();
    let early: BTreeMap<NaiveDate, String> = v["early"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(d, t)| (d.parse().unwrap(), t.as_str().unwrap().to_string()))
        .collect();
    assert!(
        closed.len() > 250 && early.len() > 50,
        "the reference lists the closures"
    );

    let mut mismatches = Vec::new();
    let mut weekdays = 0;
    let first = NaiveDate::from_ymd_opt(2000, 1, 1).unwrap();
    let last = NaiveDate::from_ymd_opt(2026, 12, 31).unwrap();
    for d in first.iter_days().take_while(|d| *d <= last) {
        if matches!(d.weekday(), Weekday::Sat | Weekday::Sun) {
            continue;
        }
        weekdays += 1;
        let theirs_trades = !closed.contains(&d);
        if calendar::is_trading_day(d) != theirs_trades {
            mismatches.push(format!(
                "{d}: ours {}, exchange-calendars {}",
                if calendar::is_trading_day(d) {
                    "trades"
                } else {
                    "closed"
                },
                if theirs_trades { "trades" } else { "closed" }
            ));
            continue;
        }
        if !theirs_trades {
            continue;
        }
        let ours_close = calendar::session(d)
            .map(|(_, c)| c.with_timezone(&New_York).format("%H:%M").to_string())
            .unwrap();
        let theirs_close = early.get(&d).cloned().unwrap_or_else(|| "16:00".into());
        if ours_close != theirs_close {
            mismatches.push(format!(
                "{d}: ours closes {ours_close}, exchange-calendars {theirs_close}"
            ));
        }
    }
    assert!(weekdays > 7000);
    assert!(
        mismatches.is_empty(),
        "{} days differ:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}
