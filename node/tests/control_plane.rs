//! The control plane with real `tickmesh run` processes on loopback (a
//! coordinator and trainer nodes sharing one embedded database and object
//! directory): a SIGKILLed trainer's jobs are re-owned within 10 s and
//! resume from their last snapshot; a trainer cut off past its lease (its
//! own network namespace, whose veth pair goes down; a SIGSTOP where
//! namespaces cannot be made) writes nothing more, cut off or healed; a
//! coordinator SIGKILLed and restarted mid-run loses no job and trains none
//! twice; a failing job is retried, then marked failed, while the next job
//! still runs; and forged, malformed or oversized requests (on the mesh and
//! on the Admin API) are refused while the cluster keeps serving. The nodes
//! talk over the ractor_cluster mesh (each has a cluster port). Every check
//! reads the job table, the lineage in `job_attempts`, the registry and the
//! checkpoints themselves.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ractor::RpcReplyPort;
use ractor_cluster::{BytesConvertable, RactorClusterMessage};
use tickmesh_core::types::Interval;
use tickmesh_io::db::{Db, JobRow};
use tickmesh_io::store::{buckets, LocalStore, ObjectStore};
use tickmesh_proto::auth::{AdminConn, Link};
use tickmesh_proto::mesh::{CoordinatorPortMsg, Register, Registered, Scope, Wire};
use tickmesh_proto::v1::admin_client::AdminClient;
use tickmesh_proto::v1::{ListJobsRequest, ListNodesRequest, StartTrainingRequest};

const INTERVAL: Interval = Interval::M1;
const COOKIE: &str = "control-plane-cookie";

/// One cluster at a time: on two cores, several clusters training at once
/// starve each other's heartbeats.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A free port never handed out before in this process: the tests run at
/// once, and two clusters on one port would talk to each other.
fn free_port() -> u16 {
    static USED: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let p = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut used = USED.lock().unwrap();
        if !used.contains(&p) {
            used.push(p);
            return p;
        }
    }
}

/// A `tickmesh run` process, killed when dropped; its log is kept.
struct Proc {
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {}", self.pid());
    }

    /// SIGKILL, and reap.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
        }
        self.kill();
    }
}

/// A network namespace joined to this one by a veth pair: a node run inside
/// it reaches the others only through the pair, so bringing the pair down
/// partitions it (packets are dropped; no connection is reset).
struct Netns {
    name: String,
    host_if: String,
    ns_if: String,
    host_ip: String,
    ns_ip: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    /// Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2.
    fn create() -> Result<Netns, String> {
        let id = std::process::id() % 100_000;
        let net = 16 + (id % 200);
        let ns = Netns {
            name: format!("tmcp{id}"),
            host_if: format!("tmh{id}"),
            ns_if: format!("tmn{id}"),
            host_ip: format!("10.77.{net}.1"),
            ns_ip: format!("10.77.{net}.2"),
        };
        ip(&["netns", "add", &ns.name])?;
        let setup = || -> Result<(), String> {
            ip(&[
                "link",
                "add",
                &ns.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &ns.ns_if,
            ])?;
            ip(&["link", "set", &ns.ns_if, "netns", &ns.name])?;
            ip(&[
                "addr",
                "add",
                &format!("{}/24", ns.host_ip),
                "dev",
                &ns.host_if,
            ])?;
            ip(&["link", "set", &ns.host_if, "up"])?;
            let inside = |a: &[&str]| {
                let mut v = vec!["netns", "exec", ns.name.as_str(), "ip"];
                v.extend_from_slice(a);
                ip(&v)
            };
            inside(&["addr", "add", &format!("{}/24", ns.ns_ip), "dev", &ns.ns_if])?;
            inside(&["link", "set", &ns.ns_if, "up"])?;
            inside(&["link", "set", "lo", "up"])
        };
        // On failure the half-made namespace is removed by Drop.
        setup().map(|()| ns)
    }

    /// Takes the namespace's end of the pair down (`up = false`) or up.
    fn link(&self, up: bool) {
        ip(&[
            "netns",
            "exec",
            &self.name,
            "ip",
            "link",
            "set",
            &self.ns_if,
            if up { "up" } else { "down" },
        ])
        .unwrap();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

struct Cluster {
    dir: tempfile::TempDir,
    /// The node run in a network namespace, and the namespace.
    netns: Option<(String, Netns)>,
    config: PathBuf,
    grpc: u16,
    /// The coordinator node's mesh port.
    mesh: u16,
    db: Db,
    store: LocalStore,
    procs: Vec<(String, Proc)>,
}

impl Cluster {
    /// Writes the config, loads `tickers` (synthetic 1-minute bars, aggregated)
    /// and the few rows of `tiny` (too few to train on) into the shared
    /// database. Trainers run one job at a time.
    async fn new(
        trainers: &[&str],
        tickers: &[&str],
        tiny: Option<&str>,
        lease_secs: u64,
    ) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let (_, adapters) = common::embedded(&data).await;
        for t in tickers {
            common::store_synthetic(&adapters, t, "2024-03-04", "2024-03-08").await;
        }
        if let Some(t) = tiny {
            common::store_synthetic(&adapters, t, "2024-03-04", "2024-03-04").await;
        }
        let mut all: Vec<String> = tickers.iter().map(|t| t.to_string()).collect();
        all.extend(tiny.map(str::to_string));
        tickmesh_aggregate::aggregator::run(&common::aggregator_args(&adapters), &all, INTERVAL)
            .await
            .unwrap();
        let grpc = free_port();
        let mesh = free_port();
        let mut nodes = format!(
            "[[nodes]]\nname = \"coord\"\nroles = [\"coordinator\"]\ncluster_port = {mesh}\n"
        );
        for t in trainers {
            nodes.push_str(&format!(
                "\n[[nodes]]\nname = \"{t}\"\nroles = [\"train\"]\njobs = 1\ndevice = \"cpu\"\ncluster_port = {}\n",
                free_port()
            ));
        }
        let config = dir.path().join("cluster.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[cluster]
name = "control-plane-test"
backend = "embedded"
cookie = "{COOKIE}"

[embedded]
data_dir = "{data}"

[coordinator]
listen = "127.0.0.1:{grpc}"
heartbeat_secs = 1
lease_secs = {lease_secs}
max_attempts = 2
retry_backoff_ms = 200

[serve]
http_listen = "127.0.0.1:0"

# Every version trained here becomes champion: the test is about the control
# plane, promote and rollback (tests/promotion.rs covers the gate).
[promotion]
gate = false

[train]
hidden = 8
seq_len = 10
epochs = 40
patience = 1000
snapshot_every = 2
device = "cpu"

{nodes}"#,
                data = data.display()
            ),
        )
        .unwrap();
        let store = LocalStore::open(data.join("store")).unwrap();
        Cluster {
            db: adapters.db.clone(),
            netns: None,
            dir,
            config,
            grpc,
            mesh,
            store,
            procs: Vec::new(),
        }
    }

    fn start(&mut self, node: &str) {
        self.start_env(node, &[]);
    }

    /// Jobs come from the Admin API only: drops the aggregation's
    /// `start_model` messages from the spool (before the coordinator starts).
    fn drop_start_model(&self) {
        let spool = self
            .dir
            .path()
            .join("data/raw")
            .join(tickmesh_core::types::topics::START_MODEL);
        for f in std::fs::read_dir(&spool).unwrap() {
            let p = f.unwrap().path();
            if p.is_file() {
                std::fs::remove_file(p).unwrap();
            }
        }
    }

    /// Puts `node` in a network namespace of its own (before any node
    /// starts): it and the coordinator's mesh server then use the veth
    /// pair's addresses, so cutting the pair partitions it from the rest.
    fn isolate(&mut self, node: &str) -> Result<(), String> {
        let ns = Netns::create()?;
        let text = std::fs::read_to_string(&self.config).unwrap();
        let text = text
            .replace(
                "name = \"coord\"\n",
                &format!("name = \"coord\"\nhost = \"{}\"\n", ns.host_ip),
            )
            .replace(
                &format!("name = \"{node}\"\n"),
                &format!("name = \"{node}\"\nhost = \"{}\"\n", ns.ns_ip),
            );
        std::fs::write(&self.config, text).unwrap();
        self.netns = Some((node.to_string(), ns));
        Ok(())
    }

    /// Cuts (`false`) or heals (`true`) the isolated node's network.
    fn connect_isolated(&self, up: bool) {
        self.netns.as_ref().expect("a node is isolated").1.link(up);
    }

    fn start_env(&mut self, node: &str, env: &[(&str, &str)]) {
        let log = self.dir.path().join(format!(
            "{node}-{}.log",
            self.procs.iter().filter(|(n, _)| n == node).count()
        ));
        let mut cmd = match &self.netns {
            Some((n, ns)) if n == node => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_tickmesh")]);
                c
            }
            _ => Command::new(env!("CARGO_BIN_EXE_tickmesh")),
        };
        let child = cmd
            .args(["run", "--node", node, "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        self.procs.push((
            node.to_string(),
            Proc {
                child: Some(child),
                log,
            },
        ));
    }

    fn proc(&mut self, node: &str) -> &mut Proc {
        &mut self
            .procs
            .iter_mut()
            .rev()
            .find(|(n, _)| n == node)
            .expect("started")
            .1
    }

    /// Waits until the latest process of `node` logs `line`.
    async fn wait_log(&mut self, node: &str, line: &str, timeout: Duration) {
        let start = Instant::now();
        loop {
            let log = std::fs::read_to_string(&self.proc(node).log).unwrap_or_default();
            if log.contains(line) {
                return;
            }
            if start.elapsed() > timeout {
                panic!("{node} never logged `{line}`{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every process's log, for a failure message.
    fn logs(&self) -> String {
        let mut out = String::new();
        for (n, p) in &self.procs {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("\n----- {n} ({}) -----\n", p.log.display()));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// An Admin client with the token the embedded coordinator made.
    async fn admin(&self) -> AdminConn {
        let path = self.dir.path().join("data/admin.token");
        let start = Instant::now();
        let token = loop {
            match std::fs::read_to_string(&path) {
                Ok(t) => break t,
                Err(e) if start.elapsed() > Duration::from_secs(30) => {
                    panic!("the coordinator's admin.token: {e}{}", self.logs())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        self.admin_with(Some(token.trim())).await
    }

    async fn admin_with(&self, token: Option<&str>) -> AdminConn {
        let ch = Link::plain(&format!("127.0.0.1:{}", self.grpc), token)
            .connect(Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{e}{}", self.logs()));
        AdminClient::new(ch)
    }

    async fn train(&self, tickers: &[&str]) -> Vec<String> {
        self.train_epochs(tickers, 0).await
    }

    /// Queues `tickers` (`epochs` 0: the config's) through Admin.Train.
    async fn train_epochs(&self, tickers: &[&str], epochs: u32) -> Vec<String> {
        let r = self
            .admin()
            .await
            .train(StartTrainingRequest {
                tickers: tickers.iter().map(|t| t.to_string()).collect(),
                interval: INTERVAL.to_string(),
                model: String::new(),
                epochs,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.refused.is_empty(), "{:?}", r.refused);
        assert_eq!(r.job_ids.len(), tickers.len());
        r.job_ids
    }

    async fn jobs(&self) -> Vec<JobRow> {
        self.db.jobs(&[], 1000).await.unwrap()
    }

    /// Polls the job table until `cond` holds, up to `timeout`.
    async fn wait_jobs(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&[JobRow]) -> bool,
    ) -> Vec<JobRow> {
        let start = Instant::now();
        loop {
            let jobs = self.jobs().await;
            if cond(&jobs) {
                return jobs;
            }
            if start.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; jobs: {:#?}{}",
                    jobs.iter()
                        .map(|j| format!(
                            "{} {} node={:?} epoch={} attempts={} snapshot={} reason={}",
                            j.ticker,
                            j.state,
                            j.node,
                            j.epoch,
                            j.attempts,
                            j.snapshot_key,
                            j.reason
                        ))
                        .collect::<Vec<_>>(),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One lineage per ticker: attempts in epoch order never overlap in
    /// time, exactly the last one is `done`, and the registered champion is
    /// that attempt's version.
    async fn check_lineage(&self, ticker: &str) -> Vec<tickmesh_io::db::AttemptRow> {
        let attempts = self.db.attempts(ticker, INTERVAL).await.unwrap();
        assert!(!attempts.is_empty(), "{ticker}: no attempts");
        for w in attempts.windows(2) {
            let ended = w[0]
                .ended_at
                .unwrap_or_else(|| panic!("{ticker}: attempt {:?} never ended", w[0]));
            assert!(w[0].epoch < w[1].epoch, "{ticker}: epochs increase");
            assert!(
                w[1].assigned_at >= ended,
                "{ticker}: two owners at once: {:?} then {:?}",
                w[0],
                w[1]
            );
            assert_ne!(
                w[0].version, w[1].version,
                "{ticker}: a version per attempt"
            );
        }
        let last = attempts.last().unwrap();
        assert_eq!(last.outcome, "done", "{ticker}: {attempts:?}");
        assert!(
            attempts[..attempts.len() - 1]
                .iter()
                .all(|a| a.outcome == "ended"),
            "{ticker}: {attempts:?}"
        );
        let champions = self.db.champions().await.unwrap();
        let c = champions
            .iter()
            .find(|m| m.ticker == ticker && m.interval == INTERVAL)
            .unwrap_or_else(|| panic!("{ticker}: no champion"));
        assert_eq!(
            c.version, last.version,
            "{ticker}: the champion is the done attempt's"
        );
        attempts
    }

    /// Keys under `prefix` (bucket `models`) that are not in `before`.
    async fn keys_since(&self, prefix: &str, before: &[String]) -> Vec<String> {
        self.keys(prefix)
            .await
            .into_iter()
            .filter(|k| !before.contains(k))
            .collect()
    }

    async fn meta(&self, ticker: &str, version: i64) -> serde_json::Value {
        let key = format!("{ticker}/{INTERVAL}/v{version}/meta.json");
        let bytes = self
            .store
            .get(buckets::MODELS, &key)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{key} missing"));
        serde_json::from_slice(&bytes).unwrap()
    }

    async fn keys(&self, prefix: &str) -> Vec<String> {
        self.store.list(buckets::MODELS, prefix).await.unwrap()
    }
}

fn done(jobs: &[JobRow]) -> bool {
    !jobs.is_empty() && jobs.iter().all(|j| j.state == "done")
}

/// The first assigned job of `node` that has saved a snapshot.
fn snapshotted_on<'a>(jobs: &'a [JobRow], node: &str) -> Option<&'a JobRow> {
    jobs.iter().find(|j| {
        j.state == "assigned" && j.node.as_deref() == Some(node) && !j.snapshot_key.is_empty()
    })
}

const TICKERS: [&str; 6] = ["KILA", "KILB", "KILC", "KILD", "KILE", "KILF"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_trainers_jobs_are_reowned_within_10s_and_resume_from_their_snapshot() {
    let _one = SERIAL.lock().await;
    let mut c = Cluster::new(&["t1", "t2", "t3"], &TICKERS, None, 3).await;
    // Three slots on each trainer: six jobs spread two per trainer, and a
    // killed trainer's two fit in the others' spare slots.
    let text = std::fs::read_to_string(&c.config)
        .unwrap()
        .replace("jobs = 1\n", "jobs = 3\n");
    std::fs::write(&c.config, text).unwrap();
    // Placed only once every trainer is up.
    c.drop_start_model();
    c.start("coord");
    c.start("t1");
    c.start("t2");
    c.start("t3");
    // Every trainer up before the request.
    for t in ["t1", "t2", "t3"] {
        c.wait_log(t, "trainer pool registered", Duration::from_secs(60))
            .await;
    }
    let ids = c.train(&TICKERS).await;

    // Capacity: the most free slots first, so two jobs on each trainer.
    let jobs = c
        .wait_jobs("every job assigned", Duration::from_secs(60), |js| {
            js.iter().filter(|j| j.state == "assigned").count() == TICKERS.len()
        })
        .await;
    for t in ["t1", "t2", "t3"] {
        let n = jobs.iter().filter(|j| j.node.as_deref() == Some(t)).count();
        assert_eq!(n, 2, "a third of the jobs on {t}: {jobs:?}");
    }

    // Kill the trainer of a job that has a snapshot: it owns a third of the tickers.
    let jobs = c
        .wait_jobs("a snapshot", Duration::from_secs(90), |js| {
            js.iter()
                .any(|j| j.state == "assigned" && !j.snapshot_key.is_empty())
        })
        .await;
    let dead = jobs
        .iter()
        .find(|j| j.state == "assigned" && !j.snapshot_key.is_empty())
        .and_then(|j| j.node.clone())
        .unwrap();
    let victims: Vec<JobRow> = jobs
        .iter()
        .filter(|j| j.state == "assigned" && j.node.as_deref() == Some(dead.as_str()))
        .cloned()
        .collect();
    assert!(!victims.is_empty(), "{jobs:?}");
    c.proc(&dead).kill();
    let killed = Instant::now();

    let reowned = c
        .wait_jobs(
            "the killed trainer's jobs re-owned",
            Duration::from_secs(10),
            |js| {
                victims.iter().all(|v| {
                    js.iter().any(|j| {
                        j.id == v.id
                            && (j.state == "done"
                                || (j.state == "assigned"
                                    && j.epoch > v.epoch
                                    && j.node.as_deref() != Some(dead.as_str())))
                    })
                })
            },
        )
        .await;
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(10), "re-owned after {took:?}");
    for v in &victims {
        let now = reowned.iter().find(|j| j.id == v.id).unwrap();
        if now.state == "assigned" {
            assert_ne!(
                now.version, v.version,
                "the new attempt writes another version"
            );
        }
    }
    eprintln!("{} jobs of {dead} re-owned in {took:?}", victims.len());

    c.wait_jobs("every job done", Duration::from_secs(240), done)
        .await;
    let jobs = c.jobs().await;
    assert_eq!(jobs.len(), ids.len(), "no job lost, none added");
    let mut killed_jobs = 0;
    for t in TICKERS {
        let attempts = c.check_lineage(t).await;
        let last = attempts.last().unwrap();
        let meta = c.meta(t, last.version).await;
        // A job of the dead node may have finished just before the kill.
        match attempts
            .iter()
            .find(|a| a.node == dead && a.outcome == "ended")
        {
            Some(killed) => {
                killed_jobs += 1;
                assert_ne!(last.node, dead);
                let had_snapshot = victims
                    .iter()
                    .any(|v| v.ticker == t && !v.snapshot_key.is_empty());
                if had_snapshot {
                    let from = meta["resumed_from_epoch"].as_u64().unwrap_or(0);
                    assert!(
                        from >= 2,
                        "{t}: the new attempt resumed from the snapshot, not from scratch: {meta}"
                    );
                }
                // The killed attempt never published its version.
                let killed_keys = c
                    .keys(&format!("{t}/{INTERVAL}/v{}/", killed.version))
                    .await;
                assert!(killed_keys.is_empty(), "{killed_keys:?}");
            }
            None => assert_eq!(attempts.len(), 1, "{t}: trained once: {attempts:?}"),
        }
        // Snapshots are removed once the job is done (the trainer deletes
        // them after the coordinator accepted its checkpoint, so just after
        // the job row says done).
        let runs = format!("{t}/{INTERVAL}/.runs/");
        let start = Instant::now();
        while !c.keys(&runs).await.is_empty() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{t}: snapshots left behind: {:?}",
                c.keys(&runs).await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(killed_jobs >= 1, "the kill interrupted a job");
    for t in ["t1", "t2", "t3"].into_iter().filter(|t| *t != dead) {
        assert!(c.proc(t).alive(), "{t} keeps running");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trainer_cut_off_past_its_lease_stops_writing_and_one_lineage_remains() {
    let _one = SERIAL.lock().await;
    let tickers = ["PARA", "PARB"];
    let mut c = Cluster::new(&["t1", "t2"], &tickers, None, 3).await;
    // A real partition where network namespaces can be made (root); a
    // frozen process (SIGSTOP: no heartbeat, no write) otherwise.
    let netns = match c.isolate("t2") {
        Ok(()) => {
            eprintln!("partition: t2 runs in its own network namespace");
            true
        }
        Err(e) => {
            eprintln!("network namespaces unavailable ({e}); the partition is a SIGSTOP of t2");
            false
        }
    };
    c.start("coord");
    c.start("t1");
    c.start("t2");
    for t in ["t1", "t2"] {
        c.wait_log(t, "trainer pool registered", Duration::from_secs(60))
            .await;
    }
    // Long jobs (the config says 40 epochs): t2 is mid-run when cut off.
    c.train_epochs(&tickers, 200).await;
    let jobs = c
        .wait_jobs("a snapshot on t2", Duration::from_secs(90), |js| {
            snapshotted_on(js, "t2").is_some()
        })
        .await;
    let victim = snapshotted_on(&jobs, "t2").unwrap().clone();
    let attempt_prefix = format!(
        "{}/{INTERVAL}/.runs/{}/a{}/",
        victim.ticker, victim.id, victim.epoch
    );

    // Cut off: no heartbeat, no renewal, for longer than the lease (3 s).
    if netns {
        c.connect_isolated(false);
    } else {
        c.proc("t2").signal("-STOP");
    }
    c.wait_jobs("t2's attempt ended", Duration::from_secs(15), |js| {
        js.iter()
            .any(|j| j.id == victim.id && (j.epoch > victim.epoch || j.state == "queued"))
    })
    .await;
    let before = c.keys(&attempt_prefix).await;
    if netns {
        // Still cut off, and still running: its lease ran out before the
        // coordinator's did, so it writes nothing more. Long enough for both
        // ends to close the silent session (6 s without an answer).
        tokio::time::sleep(Duration::from_secs(8)).await;
        let during = c.keys_since(&attempt_prefix, &before).await;
        assert!(
            during.is_empty(),
            "the cut-off trainer wrote snapshots after its lease ran out: {during:?}"
        );
        assert!(c.proc("t2").alive(), "the cut-off trainer keeps running");
        c.connect_isolated(true);
    } else {
        c.proc("t2").signal("-CONT");
    }
    // Healed: its lease ran out, so it must write nothing more.
    tokio::time::sleep(Duration::from_secs(4)).await;
    // (The new owner may have finished and removed the job's snapshots.)
    let new = c.keys_since(&attempt_prefix, &before).await;
    assert!(
        new.is_empty(),
        "the fenced-off trainer wrote snapshots after its lease ran out: {new:?}"
    );
    let stale = c
        .keys(&format!(
            "{}/{INTERVAL}/v{}/",
            victim.ticker, victim.version
        ))
        .await;
    assert!(
        stale.is_empty(),
        "the fenced-off trainer published: {stale:?}"
    );

    let jobs = c
        .wait_jobs("every job done", Duration::from_secs(240), done)
        .await;
    for t in tickers {
        c.check_lineage(t).await;
    }
    let moved = jobs.iter().find(|j| j.id == victim.id).unwrap();
    assert!(
        moved.epoch > victim.epoch && moved.node.as_deref() == Some("t1"),
        "t2's job moved to t1 under a higher epoch: {moved:?}"
    );
    let log = std::fs::read_to_string(&c.proc("t2").log).unwrap();
    assert!(
        log.contains("nothing more is written") || log.contains("revoked"),
        "t2 says it stopped writing:{}",
        c.logs()
    );
    if netns {
        assert!(log.contains("heartbeat failed"), "{}", c.logs());
        // The silent session was closed (ractor_cluster alone would keep
        // it), and once healed t2 dialled again and registered again.
        let coord = std::fs::read_to_string(&c.proc("coord").log).unwrap();
        assert!(
            coord.contains("the mesh peer stopped answering"),
            "{}",
            c.logs()
        );
        let start = Instant::now();
        loop {
            let log = std::fs::read_to_string(&c.proc("t2").log).unwrap();
            if log.matches("linked to the mesh peer").count() >= 2
                && log.matches("trainer pool registered").count() >= 2
            {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "t2 reconnected and registered again after the partition healed:{}",
                c.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert!(c.proc("t2").alive(), "the healed trainer keeps running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_loses_no_job_and_a_failing_job_does_not_block_the_next() {
    let _one = SERIAL.lock().await;
    let tickers = ["RSTA", "RSTB", "RSTC"];
    let mut c = Cluster::new(&["t1"], &["RSTA", "RSTB", "RSTC", "BOOM"], Some("TINY"), 6).await;
    // Cut TINY down to a handful of rows: accepted, then failing in training.
    trim_rows(&c.db, "TINY", 12).await;
    c.start("coord");
    // BOOM's training thread panics (a failpoint).
    c.start_env("t1", &[("TICKMESH_FAILPOINT_PANIC_TICKER", "BOOM")]);
    // TINY and BOOM first: their failures must not hold up the jobs behind them.
    let mut order = vec!["TINY", "BOOM"];
    order.extend(tickers);
    let ids = c.train(&order).await;
    c.wait_jobs("the first job running", Duration::from_secs(60), |js| {
        js.iter()
            .any(|j| j.state == "assigned" && j.ticker != "TINY")
    })
    .await;
    // Security, while the cluster works (each refused, the cluster unharmed).
    refuse_forged_and_oversized(&c).await;
    c.proc("coord").kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.start("coord");

    let jobs = c
        .wait_jobs("every job finished", Duration::from_secs(300), |js| {
            js.len() == 5 && js.iter().all(|j| j.state == "done" || j.state == "failed")
        })
        .await;
    let boom = jobs.iter().find(|j| j.ticker == "BOOM").unwrap();
    assert_eq!(boom.state, "failed", "{boom:?}");
    assert_eq!(boom.attempts, 2, "a panicking job is retried, then failed");
    assert!(boom.reason.contains("panicked"), "{}", boom.reason);
    let mut got: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
    got.sort();
    let mut want: Vec<&str> = ids.iter().map(String::as_str).collect();
    want.sort();
    assert_eq!(got, want, "the same jobs, none lost");
    let tiny = jobs.iter().find(|j| j.ticker == "TINY").unwrap();
    assert_eq!(tiny.state, "failed");
    assert_eq!(tiny.attempts, 2, "retried up to coordinator.max_attempts");
    assert!(
        tiny.reason.contains("failed after 2 attempts"),
        "{}",
        tiny.reason
    );
    for t in tickers {
        let attempts = c.check_lineage(t).await;
        assert_eq!(
            attempts.len(),
            1,
            "{t} trained once across the restart: {attempts:?}"
        );
    }
    let listed = c
        .admin()
        .await
        .list_jobs(ListJobsRequest {
            ticker: "TINY".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    let status = listed.iter().find(|j| j.job_id == tiny.id).unwrap();
    assert_eq!(status.state, "failed");
    assert_eq!(status.attempts, 2);
    assert!(
        c.proc("t1").alive(),
        "the trainer reconnected instead of exiting"
    );
}

/// Keeps the first `n` rows of a ticker.
async fn trim_rows(db: &Db, ticker: &str, n: usize) {
    let rows = db
        .read_aggregated(
            ticker,
            INTERVAL,
            &tickmesh_core::config::FeatureConfig::default().columns(),
            None,
        )
        .await
        .unwrap();
    let cut = rows[n].ts;
    db.delete_aggregated_from(ticker, INTERVAL, cut)
        .await
        .unwrap();
    assert_eq!(
        db.count_aggregated(ticker, INTERVAL).await.unwrap(),
        n as i64
    );
}

/// A payload that is not what the port expects: `n` bytes of 0xff.
struct Garbage(usize);

impl BytesConvertable for Garbage {
    fn into_bytes(self) -> Vec<u8> {
        vec![0xff; self.0]
    }
    fn from_bytes(b: Vec<u8>) -> Self {
        Garbage(b.len())
    }
}

/// What a broken or hostile peer (one that has the cookie) sends to the
/// coordinator's port: the variant names are the port's.
#[derive(RactorClusterMessage)]
enum Evil {
    #[rpc]
    Register(Garbage, RpcReplyPort<Wire<Result<Registered, String>>>),
}

/// Forged, malformed and oversized requests, each refused with its reason
/// while the cluster keeps working.
async fn refuse_forged_and_oversized(c: &Cluster) {
    // No admin token, a wrong one, or the cookie: Admin is closed.
    for token in [None, Some("wrong-token"), Some(COOKIE)] {
        let e = c
            .admin_with(token)
            .await
            .list_nodes(ListNodesRequest {})
            .await
            .expect_err("Admin without its token is refused");
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{token:?}: {e:?}");
    }
    // A peer on the mesh (it has the cookie) forges and garbles.
    let port = free_port();
    let intruder = tickmesh::cluster::start_server("intruder", COOKIE, "127.0.0.1", port, None)
        .await
        .unwrap();
    tickmesh::cluster::connect(&intruder.server, &format!("127.0.0.1:{}", c.mesh), None)
        .await
        .unwrap();
    let scope = Scope::new("control-plane-test");
    let start = Instant::now();
    while scope.coordinator().is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the coordinator's port never appeared on the mesh{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // t1 runs a job, so it is registered and alive: its name is taken.
    let forged = Register {
        node: "t1".into(),
        roles: vec!["train".into()],
        gpus: 8,
        incarnation: 42,
        slots: 100,
        ..Default::default()
    };
    let r = scope
        .ask(
            "register",
            |reply| CoordinatorPortMsg::Register(forged.into(), reply),
            Duration::from_secs(10),
        )
        .await
        .expect("the coordinator answers");
    let e = r.expect_err("a registration under a live node's name is refused");
    assert!(e.contains("already registered by a live process"), "{e}");
    // A payload that does not decode, and one over the limit: refused with
    // the reason, the port keeps serving.
    let evil: ractor::ActorRef<Evil> = scope.coordinator().unwrap().get_cell().into();
    for (n, why) in [(100, "does not decode"), (5 << 20, "at most")] {
        let r = ractor::call_t!(evil, Evil::Register, 20_000, Garbage(n))
            .unwrap_or_else(|e| panic!("{n} bytes of garbage: the port did not answer: {e}"));
        match r {
            Wire::Ok(Err(e)) => assert!(e.contains(why), "{n} bytes: {e}"),
            other => panic!("{n} bytes of garbage: {other:?}"),
        }
    }
    intruder.server.stop(None);
    // The intruder never became a node.
    let nodes = c
        .admin()
        .await
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert!(nodes.iter().all(|n| n.gpus != 8), "{nodes:?}");
    let mut admin = c.admin().await;
    // 10,000 unknown tickers: refused, nothing queued.
    let flood: Vec<String> = (0..10_000).map(|i| format!("Z{i:05}")).collect();
    let t = Instant::now();
    let r = admin
        .train(StartTrainingRequest {
            tickers: flood,
            interval: INTERVAL.to_string(),
            model: String::new(),
            epochs: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.queued, 0);
    assert_eq!(r.refused.len(), 10_000);
    assert!(r.refused[0].contains("unknown ticker"), "{}", r.refused[0]);
    eprintln!("10,000 unknown tickers refused in {:?}", t.elapsed());
    let n = c.db.jobs(&[], 100_000).await.unwrap().len();
    assert!(n <= 5, "{n} jobs: the flood queued some");
    // An oversized request.
    let huge = admin
        .train(StartTrainingRequest {
            tickers: vec!["A".repeat(5 << 20)],
            interval: INTERVAL.to_string(),
            model: String::new(),
            epochs: 0,
        })
        .await;
    let code = huge.err().map(|s| s.code());
    assert!(
        matches!(
            code,
            Some(tonic::Code::OutOfRange) | Some(tonic::Code::ResourceExhausted)
        ),
        "{code:?}"
    );
}

/// The version `GET /ml/models` says the predictor serves for `ticker`.
async fn served_version(http: u16, ticker: &str) -> Option<i64> {
    let v: serde_json::Value = reqwest::get(format!("http://127.0.0.1:{http}/ml/models"))
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    v["models"]
        .as_array()?
        .iter()
        .find(|m| m["ticker"] == ticker)
        .and_then(|m| m["version"].as_i64())
}

/// The health the coordinator publishes for a trainer node.
async fn node_health(c: &Cluster, node: &str) -> i32 {
    let ch = Link::plain(&format!("127.0.0.1:{}", c.grpc), None)
        .connect(Duration::from_secs(10))
        .await
        .unwrap();
    let r = tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest {
            service: format!("tickmesh.node.{node}"),
        })
        .await;
    r.unwrap().into_inner().status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_cordon_drain_hand_off_promote_and_roll_back_through_the_admin_api() {
    use tickmesh_proto::v1::{
        CordonRequest, DrainRequest, ListModelsRequest, PromoteRequest, RetrainRequest,
        RollbackRequest,
    };
    const SERVING: i32 = 1;
    const NOT_SERVING: i32 = 2;
    let _one = SERIAL.lock().await;
    let mut c = Cluster::new(&["t1", "t2"], &["OPSA", "OPSB"], None, 4).await;
    let http = free_port();
    let text = std::fs::read_to_string(&c.config).unwrap().replace(
        "http_listen = \"127.0.0.1:0\"",
        &format!("http_listen = \"127.0.0.1:{http}\""),
    ) + &format!(
        "\n[[nodes]]\nname = \"p1\"\nroles = [\"serve\"]\ncluster_port = {}\n",
        free_port()
    );
    std::fs::write(&c.config, text).unwrap();
    c.drop_start_model();
    for n in ["coord", "t1", "t2", "p1"] {
        c.start(n);
    }
    for t in ["t1", "t2"] {
        c.wait_log(t, "trainer pool registered", Duration::from_secs(60))
            .await;
    }
    let mut admin = c.admin().await;
    let train = |epochs: u32, t: &str| StartTrainingRequest {
        tickers: vec![t.to_string()],
        interval: INTERVAL.to_string(),
        model: String::new(),
        epochs,
    };

    // Cordon t1: everything goes to t2.
    let n = admin
        .cordon(CordonRequest {
            node: "t1".into(),
            uncordon: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.state, "cordoned");
    assert_eq!(
        node_health(&c, "t1").await,
        SERVING,
        "a cordoned node still serves"
    );
    let first = admin.train(train(3, "OPSA")).await.unwrap().into_inner();
    assert_eq!(first.queued, 1, "{first:?}");
    c.wait_jobs("OPSA v1", Duration::from_secs(120), done).await;
    let attempts = c.db.attempts("OPSA", INTERVAL).await.unwrap();
    assert!(attempts.iter().all(|a| a.node == "t2"), "{attempts:?}");

    // Drain t2 (idle): NOT_SERVING, drained; uncordon t1: the retrain goes there.
    let n = admin
        .drain(DrainRequest {
            node: "t2".into(),
            handoff: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.state, "drained");
    assert_eq!(node_health(&c, "t2").await, NOT_SERVING);
    admin
        .cordon(CordonRequest {
            node: "t1".into(),
            uncordon: true,
        })
        .await
        .unwrap();
    let r = admin
        .retrain(RetrainRequest {
            ticker: "OPSA".into(),
            interval: INTERVAL.to_string(),
            epochs: 3,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.queued, 1);
    c.wait_jobs("OPSA v2", Duration::from_secs(120), done).await;
    let attempts = c.db.attempts("OPSA", INTERVAL).await.unwrap();
    assert_eq!(attempts.last().unwrap().node, "t1", "{attempts:?}");
    let (v1, v2) = (attempts[0].version, attempts.last().unwrap().version);

    // The predictor follows the champion: v2, rolled back to v1, promoted to v2.
    let wait_served = |want: i64| async move {
        let start = Instant::now();
        while served_version(http, "OPSA").await != Some(want) {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the predictor never served v{want}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    wait_served(v2).await;
    let m = admin
        .rollback(RollbackRequest {
            ticker: "OPSA".into(),
            interval: INTERVAL.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((m.version, m.status.as_str()), (v1, "champion"));
    wait_served(v1).await;
    let all = admin
        .list_models(ListModelsRequest {
            ticker: "OPSA".into(),
            interval: String::new(),
            all_versions: true,
        })
        .await
        .unwrap()
        .into_inner()
        .models;
    let status: Vec<(i64, &str)> = all.iter().map(|m| (m.version, m.status.as_str())).collect();
    assert_eq!(status, vec![(v1, "champion"), (v2, "rolled_back")]);
    let m = admin
        .promote(PromoteRequest {
            ticker: "OPSA".into(),
            interval: INTERVAL.to_string(),
            version: v2,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.version, v2);
    wait_served(v2).await;
    for (what, e) in [
        (
            "promote an unknown version",
            admin
                .promote(PromoteRequest {
                    ticker: "OPSA".into(),
                    interval: INTERVAL.to_string(),
                    version: 999,
                })
                .await
                .unwrap_err(),
        ),
        (
            "retrain a ticker without a model",
            admin
                .retrain(RetrainRequest {
                    ticker: "OPSB".into(),
                    interval: INTERVAL.to_string(),
                    epochs: 3,
                })
                .await
                .unwrap_err(),
        ),
    ] {
        assert_eq!(e.code(), tonic::Code::NotFound, "{what}: {e:?}");
    }

    // Drain t1 with handoff while it trains OPSB: the job leaves t1 at once
    // and waits (t2 is drained); readying t2 lets it resume there.
    admin.train(train(40, "OPSB")).await.unwrap();
    let running = c
        .wait_jobs("OPSB snapshotted on t1", Duration::from_secs(90), |js| {
            snapshotted_on(js, "t1").is_some_and(|j| j.ticker == "OPSB")
        })
        .await;
    let before = running.iter().find(|j| j.ticker == "OPSB").unwrap().clone();
    let n = admin
        .drain(DrainRequest {
            node: "t1".into(),
            handoff: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.state, "drained", "{n:?}");
    assert!(n.running.is_empty());
    let queued = c
        .wait_jobs("OPSB queued again", Duration::from_secs(10), |js| {
            js.iter().any(|j| j.id == before.id && j.state == "queued")
        })
        .await;
    let q = queued.iter().find(|j| j.id == before.id).unwrap();
    assert_eq!(
        q.attempts,
        before.attempts - 1,
        "a handoff is not a failed attempt"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        c.db.job(&before.id).await.unwrap().unwrap().state,
        "queued",
        "nothing takes a job while every trainer is drained"
    );
    admin
        .cordon(CordonRequest {
            node: "t2".into(),
            uncordon: true,
        })
        .await
        .unwrap();
    assert_eq!(node_health(&c, "t2").await, SERVING);
    c.wait_jobs("OPSB done", Duration::from_secs(180), done)
        .await;
    let attempts = c.check_lineage("OPSB").await;
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(attempts[0].node, "t1");
    assert!(attempts[0].reason.contains("handoff"), "{attempts:?}");
    assert_eq!(attempts[1].node, "t2");
    let meta = c.meta("OPSB", attempts[1].version).await;
    assert!(
        meta["resumed_from_epoch"].as_u64().unwrap_or(0) >= 2,
        "the handed-off job resumed from its snapshot: {meta}"
    );
    let nodes = admin
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    let states: Vec<(&str, &str)> = nodes
        .iter()
        .map(|n| (n.node.as_str(), n.state.as_str()))
        .collect();
    assert_eq!(states, vec![("t1", "drained"), ("t2", "ready")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_admin_port_refuses_plaintext_and_a_node_with_a_wrong_cookie_exits() {
    let _one = SERIAL.lock().await;
    let mut c = Cluster::new(&["t1", "t9"], &["TLSA"], None, 4).await;
    let certs = c.dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    common::make_certs(&certs);
    let text = std::fs::read_to_string(&c.config).unwrap().replace(
        "[coordinator]\n",
        &format!(
            "[coordinator]\ntls_cert_file = \"{0}/server.pem\"\ntls_key_file = \"{0}/server.key\"\ntls_ca_file = \"{0}/ca.pem\"\n",
            certs.display()
        ),
    );
    std::fs::write(&c.config, text).unwrap();
    c.start("coord");
    c.start("t1");
    // The trainer registers on the mesh.
    c.wait_log("t1", "trainer pool registered", Duration::from_secs(60))
        .await;
    let addr = format!("127.0.0.1:{}", c.grpc);
    let token = std::fs::read_to_string(c.dir.path().join("data/admin.token")).unwrap();
    let token = token.trim();
    // Plaintext to the TLS port: no call gets through, even with the token.
    let plain = Link::plain(&addr, Some(token));
    let r = match plain.connect(Duration::from_secs(5)).await {
        Ok(ch) => AdminClient::new(ch)
            .list_nodes(ListNodesRequest {})
            .await
            .map(|_| ())
            .map_err(|e| format!("{:?}: {}", e.code(), e.message())),
        Err(e) => Err(e),
    };
    let e = r.expect_err("plaintext to a TLS port must fail");
    eprintln!("plaintext to the TLS port: {e}");
    // TLS without the CA's trust: refused too.
    let other = c.dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    common::make_certs(&other);
    let untrusted = Link::plain(&addr, Some(token))
        .with_tls(&other.join("ca.pem"), "127.0.0.1")
        .unwrap();
    let r = match untrusted.connect(Duration::from_secs(5)).await {
        Ok(ch) => AdminClient::new(ch)
            .list_nodes(ListNodesRequest {})
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    assert!(
        r.is_err(),
        "a server the client's CA did not sign is not trusted"
    );
    // The same call over TLS with the cluster's CA works: the refusals
    // above were the transport's. Operators over TLS, with the token, while
    // the node keeps serving.
    let link = Link::plain(&addr, Some(token))
        .with_tls(&certs.join("ca.pem"), "127.0.0.1")
        .unwrap();
    let ch = link.connect(Duration::from_secs(10)).await.unwrap();
    let nodes = AdminClient::new(ch)
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(nodes[0].node, "t1");
    assert_eq!(nodes[0].state, "ready");
    // `tickmesh admin nodes` reads the CA from the config too.
    let out = Command::new(env!("CARGO_BIN_EXE_tickmesh"))
        .args(["admin", "nodes", "--config"])
        .arg(&c.config)
        .env_remove("TICKMESH_ADMIN_TOKEN")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("t1") && stdout.contains("1 nodes"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A wrong token from the CLI: non-zero, naming the refusal.
    let out = Command::new(env!("CARGO_BIN_EXE_tickmesh"))
        .args(["admin", "jobs", "--config"])
        .arg(&c.config)
        .env("TICKMESH_ADMIN_TOKEN", "a-wrong-admin-token-value")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("Unauthenticated"), "{stderr}");
    assert!(c.proc("coord").alive() && c.proc("t1").alive());

    // A trainer with a wrong cookie: the coordinator's node refuses its mesh
    // handshake; its link to the mesh is restarted by the node's root
    // supervisor within its budget, and the node gives up and exits
    // non-zero saying why.
    c.start_env("t9", &[("TICKMESH_COOKIE", "not-the-cluster-cookie")]);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = c.proc("t9").child.as_mut().unwrap().try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "t9 kept running with a wrong cookie{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success(), "{status:?}");
    let log = std::fs::read_to_string(&c.proc("t9").log).unwrap();
    assert!(
        log.contains("gives up") && log.contains("refused this node's handshake"),
        "{log}"
    );
    assert_eq!(
        log.matches("child exited; restarting").count(),
        3,
        "max_restarts restarts before giving up: {log}"
    );
    assert!(c.proc("coord").alive() && c.proc("t1").alive());
}
