//! The aggregator killed in the middle of a load, on the real PostgreSQL
//! and S3 server (`scripts/services.sh up`).
//!
//! Four tickers of 1-minute bars exist in two versions: A, and B (prices
//! ×1.5, a week in the middle gone). Each round writes the version the first
//! ticker's series does not hold to the store and starts a real `tickmesh aggregate` process, which is killed
//! with SIGKILL 10 times in the middle of a load: five times with every row
//! written but not committed (a failpoint pauses it there), five times at a
//! random moment after a load began. All the while a reader polls
//! `aggregated_data`: every ticker's series must be all of A or all of B,
//! never a mix, and no (ticker, interval, ts) twice. After the kills a run
//! to completion leaves the last version.

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tickmesh_aggregate::resample::resample;
use tickmesh_core::synthetic::SyntheticMarket;
use tickmesh_core::types::{bars_object_key, Bar, Interval, IsoWeek};
use tickmesh_io::db::Db;
use tickmesh_io::parquet_io::encode_bars;
use tickmesh_io::store::buckets;
use tickmesh_io::Adapters;

const TICKERS: [&str; 4] = ["AGCR1", "AGCR2", "AGCR3", "AGCR4"];

struct Proc {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(config: &std::path::Path, dir: &std::path::Path, n: usize, pause: bool) -> Proc {
    let log = dir.join(format!("aggregate-{n}.log"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tickmesh"));
    cmd.args(["aggregate", "--interval", "1m", "--tickers"])
        .arg(TICKERS.join(","))
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    if pause {
        cmd.env("TICKMESH_FAILPOINT_PAUSE_BEFORE_LOAD_COMMIT_MS", "60000");
    }
    Proc {
        child: cmd.spawn().unwrap(),
        log,
    }
}

/// Waits until the process's log has `line`; false when it exited first.
fn wait_for(p: &mut Proc, line: &str, timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        if std::fs::read_to_string(&p.log)
            .unwrap_or_default()
            .contains(line)
        {
            return true;
        }
        if p.child.try_wait().unwrap().is_some() {
            return false;
        }
        assert!(
            start.elapsed() < timeout,
            "no `{line}` after {timeout:?}:\n{}",
            common::tail(&p.log)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Per ticker, a version's (rows, sum of closes).
type Expect = BTreeMap<String, (i64, f64)>;

/// The two versions of the bars, and what each loads.
fn versions() -> [(BTreeMap<String, Vec<Bar>>, Expect); 2] {
    let (from, to) = ("2024-01-02".parse().unwrap(), "2024-03-29".parse().unwrap());
    let mut a = BTreeMap::new();
    let mut b = BTreeMap::new();
    for t in TICKERS {
        let bars = SyntheticMarket.bars(t, from, to);
        // A week in the middle: its rows go when B replaces A.
        let gone = IsoWeek::of(bars[bars.len() / 2].t);
        let scaled: Vec<Bar> = bars
            .iter()
            .filter(|x| IsoWeek::of(x.t) != gone)
            .map(|x| Bar {
                o: x.o * 1.5,
                h: x.h * 1.5,
                l: x.l * 1.5,
                c: x.c * 1.5,
                vw: x.vw * 1.5,
                ..*x
            })
            .collect();
        a.insert(t.to_string(), bars);
        b.insert(t.to_string(), scaled);
    }
    let expect = |v: &BTreeMap<String, Vec<Bar>>| -> Expect {
        v.iter()
            .map(|(t, bars)| {
                let r = resample(bars, Interval::M1).bars;
                (t.clone(), (r.len() as i64, r.iter().map(|b| b.c).sum()))
            })
            .collect()
    };
    let (ea, eb) = (expect(&a), expect(&b));
    [(a, ea), (b, eb)]
}

/// Writes a version's weekly objects (and deletes the weeks it lacks).
async fn write_version(a: &Adapters, bars: &BTreeMap<String, Vec<Bar>>, all_weeks: &[IsoWeek]) {
    for (t, bars) in bars {
        let mut weeks: BTreeMap<IsoWeek, Vec<Bar>> = BTreeMap::new();
        for b in bars {
            weeks.entry(IsoWeek::of(b.t)).or_default().push(*b);
        }
        for w in all_weeks {
            let key = bars_object_key(t, *w);
            match weeks.get(w) {
                Some(b) => a
                    .store
                    .put(buckets::STOCK_DATA, &key, encode_bars(t, b).unwrap())
                    .await
                    .unwrap(),
                None => a.store.delete(buckets::STOCK_DATA, &key).await.unwrap(),
            }
        }
    }
}

/// Which version each ticker's series is in now: 0 (none), 1 (A), 2 (B),
/// or an error describing a mix or a duplicate.
async fn state(pool: &sqlx::PgPool, versions: &[Expect; 2]) -> Result<Vec<u8>, String> {
    let rows: Vec<(String, i64, i64, Option<f64>)> = sqlx::query_as(
        "SELECT ticker, count(*), count(DISTINCT ts), sum(close) FROM aggregated_data WHERE ticker LIKE 'AGCR%' AND \"interval\" = '1m' GROUP BY ticker",
    )
    .fetch_all(pool)
    .await
    .map_err(|e| e.to_string())?;
    let by: BTreeMap<String, (i64, i64, f64)> = rows
        .into_iter()
        .map(|(t, n, d, s)| (t, (n, d, s.unwrap_or(0.0))))
        .collect();
    let mut out = Vec::new();
    for t in TICKERS {
        let Some(&(n, distinct, sum)) = by.get(t) else {
            out.push(0);
            continue;
        };
        if n != distinct {
            return Err(format!("{t}: {n} rows but {distinct} distinct times"));
        }
        let is = |v: &Expect| {
            let (en, es) = v[t];
            n == en && ((sum - es) / es).abs() < 1e-9
        };
        match (is(&versions[0]), is(&versions[1])) {
            (true, _) => out.push(1),
            (_, true) => out.push(2),
            _ => {
                return Err(format!(
                    "{t}: {n} rows summing to {sum}: neither version A {:?} nor B {:?}",
                    versions[0][t], versions[1][t]
                ))
            }
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregator_killed_mid_load_10_times_leaves_old_or_new_rows_never_a_mix() {
    let (cfg, a) = common::distributed("aggcrash").await;
    let Db::Postgres(pool) = a.db.clone() else {
        panic!("PostgreSQL expected")
    };
    sqlx::query("DELETE FROM aggregated_data WHERE ticker LIKE 'AGCR%'")
        .execute(&pool)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cluster.toml");
    std::fs::write(&config, common::services_toml(&cfg, "aggcrash")).unwrap();
    let [(bars_a, expect_a), (bars_b, expect_b)] = versions();
    let expect = [expect_a, expect_b];
    let all_weeks: Vec<IsoWeek> = {
        let mut w: Vec<IsoWeek> = bars_a[TICKERS[0]]
            .iter()
            .map(|b| IsoWeek::of(b.t))
            .collect();
        w.dedup();
        w
    };

    // Version A, loaded to completion; then B, replacing it, timed.
    write_version(&a, &bars_a, &all_weeks).await;
    let mut p = spawn(&config, dir.path(), 0, false);
    let status = p.child.wait().unwrap();
    assert!(status.success(), "{}", common::tail(&p.log));
    assert_eq!(state(&pool, &expect).await.unwrap(), [1, 1, 1, 1]);
    write_version(&a, &bars_b, &all_weeks).await;
    let mut p = spawn(&config, dir.path(), 100, false);
    assert!(wait_for(
        &mut p,
        "loading aggregated_data",
        Duration::from_secs(120)
    ));
    let began = Instant::now();
    let status = p.child.wait().unwrap();
    assert!(status.success(), "{}", common::tail(&p.log));
    assert_eq!(state(&pool, &expect).await.unwrap(), [2, 2, 2, 2]);
    // Random kills land within the span of a whole run's loads.
    let loads_span = began.elapsed().as_millis() as u64;
    eprintln!("a whole run's loads took {loads_span} ms");

    // A reader polls all the while.
    let stop = Arc::new(AtomicBool::new(false));
    let polls = Arc::new(AtomicUsize::new(0));
    let violations = Arc::new(Mutex::new(Vec::<String>::new()));
    let reader = {
        let (pool, stop, polls, violations, expect) = (
            pool.clone(),
            stop.clone(),
            polls.clone(),
            violations.clone(),
            expect.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match state(&pool, &expect).await {
                    Ok(_) => {
                        polls.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => violations.lock().unwrap().push(e),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let mut rng = rand::rng();
    let mut version = 1usize; // what the store holds: 0 = A, 1 = B
    let mut committed_before = [2u8; 4];
    for round in 1..=10 {
        // The version the first ticker does not hold, so every round has
        // rows to replace.
        version = if committed_before[0] == 1 { 1 } else { 0 };
        write_version(&a, if version == 0 { &bars_a } else { &bars_b }, &all_weeks).await;
        let pause = round % 2 == 1;
        let mut p = spawn(&config, dir.path(), round, pause);
        if pause {
            let paused = wait_for(
                &mut p,
                "failpoint: load written, pausing before its commit",
                Duration::from_secs(120),
            );
            assert!(
                paused,
                "round {round}: exited first:\n{}",
                common::tail(&p.log)
            );
        } else {
            let began = wait_for(&mut p, "loading aggregated_data", Duration::from_secs(120));
            assert!(
                began,
                "round {round}: exited first:\n{}",
                common::tail(&p.log)
            );
            std::thread::sleep(Duration::from_millis(
                rng.random_range(0..loads_span * 9 / 10 + 1),
            ));
        }
        let finished = p.child.try_wait().unwrap().is_some();
        p.child.kill().unwrap_or(());
        p.child.wait().unwrap();
        let log = std::fs::read_to_string(&p.log).unwrap();
        let loaded: Vec<&str> = TICKERS
            .iter()
            .copied()
            .filter(|t| {
                log.lines().any(|l| {
                    l.contains("aggregated_data loaded") && l.contains(&format!("ticker={t} "))
                })
            })
            .collect();
        let now = state(&pool, &expect)
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        eprintln!(
            "round {round}: killed {}; loads committed before the kill: {loaded:?}; series now {now:?} (A = 1, B = 2)",
            if pause { "at the pre-commit failpoint" } else { "at a random moment of a load" }
        );
        assert!(!finished, "round {round}: the run finished before the kill");
        // Loads the kill interrupted: begun, with no line saying they
        // committed. The kill can land between a commit and its log line,
        // so such a series holds either version (a whole one: `state`
        // refuses a mix); every other series holds this round's version
        // only if the log says its load committed, else it is as it was.
        let in_flight: Vec<&str> = TICKERS
            .iter()
            .copied()
            .filter(|t| {
                !loaded.contains(t)
                    && log.lines().any(|l| {
                        l.contains("loading aggregated_data") && l.contains(&format!("ticker={t} "))
                    })
            })
            .collect();
        let new = version as u8 + 1;
        for (i, t) in TICKERS.iter().enumerate() {
            if in_flight.contains(t) && !pause {
                assert!(
                    now[i] == committed_before[i] || now[i] == new,
                    "round {round}: {t} holds {}",
                    now[i]
                );
                continue;
            }
            let want = if loaded.contains(t) {
                new
            } else {
                committed_before[i]
            };
            assert_eq!(now[i], want, "round {round}: {t}");
        }
        if pause {
            assert!(loaded.is_empty(), "round {round}: a paused load committed");
        }
        committed_before.copy_from_slice(&now);
    }

    // A run to completion leaves the last version everywhere.
    let mut p = spawn(&config, dir.path(), 99, false);
    let status = p.child.wait().unwrap();
    assert!(status.success(), "{}", common::tail(&p.log));
    stop.store(true, Ordering::Relaxed);
    reader.await.unwrap();
    let want = version as u8 + 1;
    assert_eq!(state(&pool, &expect).await.unwrap(), [want; 4]);
    let v = violations.lock().unwrap();
    assert!(v.is_empty(), "the reader saw a partial load: {v:?}");
    let n = polls.load(Ordering::Relaxed);
    eprintln!("the reader checked {n} snapshots, none partial");
    assert!(n > 50, "the reader polled only {n} times");
}
