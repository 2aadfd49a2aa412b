//! `ModelHandle`: what a forecast request reads for one (ticker, interval).
//!
//! - **The served version** sits in a `watch` channel. The predictor actor
//!   replaces it whole once a new version is loaded, verified and warmed
//!   ([`crate::predictor`]). A request clones the `Arc` it finds and keeps it
//!   to the end, so requests in flight finish on the version they started
//!   with, and nothing a request does can leave the handle unusable: there
//!   is no lock a panic could poison.
//! - **The history** (the stored rows folded into the indicator state) is
//!   re-read from `aggregated_data` at most every `history_refresh_ms`, by
//!   one request while the others wait for it. Each distinct history gets a
//!   generation number.
//! - **Flights.** A forecast is computed by a flight: a task that advances
//!   the recursion in chunks of [`CHUNK`] steps, each chunk on a blocking
//!   thread holding one of the node's compute slots, publishing the points
//!   so far. Forecasts of the same version and history are prefixes of one
//!   another, so with `coalesce` on, concurrent requests share one flight
//!   (a longer request extends it; a shorter one is answered as soon as
//!   its points exist) and the finished trajectory answers later requests
//!   until the data or the version changes. A flight that nobody waits for
//!   any more stops at its next chunk.
//! - **Limits.** Requests in flight per model above `max_per_model` get
//!   `429`, above `max_queue` on the node `503`, both with `Retry-After`; a
//!   request that is not answered within `request_timeout_ms` gets `503`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tickmesh_core::config::ServeConfig;
use tickmesh_core::types::Interval;
use tickmesh_io::db::Db;
use tickmesh_model::forecast::{ForecastPoint, Forecaster, History};
use tickmesh_model::native::Scratch;
use tokio::sync::{watch, Mutex, Semaphore};

use crate::predictor::{ForecastResponse, ModelInfo};
use crate::ServeError;

/// Forecast steps computed per turn on a compute slot: a long forecast
/// yields the slot this often, so short ones never wait for a whole long one.
pub const CHUNK: usize = 16;

/// A loaded version, ready to forecast.
pub struct Served {
    pub forecaster: Forecaster,
    pub info: ModelInfo,
}

/// A version the predictor refused, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Refusal {
    pub version: i64,
    pub reason: String,
    pub at: DateTime<Utc>,
}

/// A version whose load failed for a reason that may pass (the store or the
/// database unreachable): it is tried again at `next_at`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Retry {
    pub version: i64,
    pub attempts: u32,
    pub last_error: String,
    pub next_at: DateTime<Utc>,
}

/// What the predictor of a (ticker, interval) is doing, for `GET /ml/models`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Status {
    /// The version being loaded, if any.
    pub loading: Option<i64>,
    /// A failed load waiting for its next try.
    pub retry: Option<Retry>,
    /// The versions refused (newest last, at most [`KEPT_REFUSALS`]).
    pub refused: Vec<Refusal>,
    /// Times the predictor actor was restarted after a crash.
    pub restarts: u64,
}

/// Refusals kept per model.
pub const KEPT_REFUSALS: usize = 8;

/// Something that happened to a model of this node, for `GET /events`
/// (the dashboard's live updates).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelEvent {
    /// `served` (a version swapped in), `refused`, `retrying`.
    pub kind: &'static str,
    pub ticker: String,
    pub interval: Interval,
    pub version: i64,
    /// The version served before (`served`), else `None`.
    pub previous: Option<i64>,
    /// The reason (`refused`, `retrying`), else empty.
    pub detail: String,
    pub at: DateTime<Utc>,
}

/// How a node's forecasts are bounded (`[serve]`).
pub struct Limits {
    pub cfg: ServeConfig,
    compute: Semaphore,
    inflight: AtomicUsize,
}

impl Limits {
    pub fn new(cfg: ServeConfig) -> Arc<Self> {
        let slots = cfg.compute_slots();
        Arc::new(Limits {
            cfg,
            compute: Semaphore::new(slots),
            inflight: AtomicUsize::new(0),
        })
    }

    /// Requests being answered on this node now.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }
}

/// Counts a request in, and out when dropped.
struct Admitted<'a> {
    counters: [&'a AtomicUsize; 2],
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        for c in self.counters {
            c.fetch_sub(1, Ordering::Relaxed);
        }
        metrics::gauge!("tickmesh_forecast_inflight").decrement(1.0);
    }
}

/// The points a flight has so far, or how it ended.
#[derive(Clone)]
enum Progress {
    Running(Arc<Vec<ForecastPoint>>),
    Done(Arc<Vec<ForecastPoint>>),
    Failed(ServeError),
    /// It stopped because nobody waited, as a request joined it: join again.
    Abandoned,
}

/// (model version, history generation): what determines a trajectory.
type TrajectoryKey = (i64, u64);

/// A trajectory's points, shared.
type Points = Arc<Vec<ForecastPoint>>;

/// One computation of a trajectory.
struct Flight {
    /// The trajectory it computes.
    key: TrajectoryKey,
    /// Steps wanted so far (a later, longer request raises it).
    target: Arc<AtomicUsize>,
    tx: Arc<watch::Sender<Progress>>,
}

/// What a request asks of a flight.
struct Want<'a> {
    key: TrajectoryKey,
    served: &'a Arc<Served>,
    history: &'a Arc<History>,
    n_steps: usize,
    limits: &'a Arc<Limits>,
}

#[derive(Default)]
struct Flights {
    running: Option<Flight>,
    /// The last finished trajectory.
    done: Option<(TrajectoryKey, Points)>,
}

#[derive(Default)]
struct HistorySlot {
    history: Option<Arc<History>>,
    fetched: Option<Instant>,
    generation: u64,
    /// The served version's one-step errors on the stored bars after its
    /// training data.
    live: Option<LiveTrack>,
}

/// One version's live one-step errors (the last `window` of them).
struct LiveTrack {
    version: i64,
    /// The last bar of the version's training data: bars after it are live.
    data_to: DateTime<Utc>,
    /// (bar time, squared error of the predicted close).
    errors: std::collections::VecDeque<(DateTime<Utc>, f64)>,
    window: usize,
}

impl LiveTrack {
    fn push(&mut self, ts: DateTime<Utc>, err: f64) {
        self.errors.push_back((ts, err * err));
        while self.errors.len() > self.window {
            self.errors.pop_front();
        }
    }
}

/// A served version's one-step error on the stored bars after its
/// training data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LiveScore {
    pub version: i64,
    /// Bars scored (at most `[retrain] drift_bars`, the newest).
    pub bars: usize,
    pub rmse: f64,
    /// The newest bar scored.
    pub through: DateTime<Utc>,
}

/// One (ticker, interval): see the module header.
pub struct ModelHandle {
    pub ticker: String,
    pub interval: Interval,
    events: tokio::sync::broadcast::Sender<ModelEvent>,
    /// Bars the live error is measured on (`[retrain] drift_bars`).
    live_window: usize,
    served: watch::Sender<Option<Arc<Served>>>,
    status: watch::Sender<Status>,
    history: Mutex<HistorySlot>,
    flights: Mutex<Flights>,
    inflight: AtomicUsize,
}

impl ModelHandle {
    fn new(
        ticker: &str,
        interval: Interval,
        events: tokio::sync::broadcast::Sender<ModelEvent>,
        live_window: usize,
    ) -> Arc<Self> {
        Arc::new(ModelHandle {
            ticker: ticker.to_string(),
            interval,
            events,
            live_window,
            served: watch::Sender::new(None),
            status: watch::Sender::new(Status::default()),
            history: Mutex::new(HistorySlot::default()),
            flights: Mutex::new(Flights::default()),
            inflight: AtomicUsize::new(0),
        })
    }

    /// The version served now.
    pub fn served(&self) -> Option<Arc<Served>> {
        self.served.borrow().clone()
    }

    /// Serves `s` from now on; requests in flight keep the version they hold.
    pub fn swap(&self, s: Served) {
        let version = s.info.version;
        metrics::gauge!("tickmesh_predictor_version", "ticker" => self.ticker.clone(), "interval" => self.interval.to_string())
            .set(version as f64);
        let previous = self
            .served
            .send_replace(Some(Arc::new(s)))
            .map(|p| p.info.version);
        self.event("served", version, previous, String::new());
    }

    /// Tells `/events` listeners (none: nothing happens).
    pub fn event(&self, kind: &'static str, version: i64, previous: Option<i64>, detail: String) {
        let _ = self.events.send(ModelEvent {
            kind,
            ticker: self.ticker.clone(),
            interval: self.interval,
            version,
            previous,
            detail,
            at: Utc::now(),
        });
    }

    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    pub fn update_status(&self, f: impl FnOnce(&mut Status)) {
        self.status.send_modify(f);
    }

    /// The stored history for `forecaster`'s shape, re-read when older than
    /// `refresh` (or of another shape), with its generation. When
    /// `forecaster` is the version served, the stored bars after its
    /// training data are scored on the way (its live error, [`Self::live`]);
    /// a newly served version is scored from its data on.
    pub async fn history(
        &self,
        db: &Db,
        forecaster: &Forecaster,
        refresh: Duration,
    ) -> tickmesh_core::Result<(Arc<History>, u64)> {
        let mut slot = self.history.lock().await;
        let empty = forecaster.history();
        let version = forecaster.meta.version;
        let scoring = self.served().is_some_and(|s| s.info.version == version);
        let rescore = scoring && slot.live.as_ref().map(|l| l.version) != Some(version);
        let fresh = slot.fetched.is_some_and(|t| t.elapsed() < refresh);
        if let Some(h) = slot.history.as_ref().filter(|h| h.same_shape(&empty)) {
            if fresh && !rescore {
                return Ok((h.clone(), slot.generation));
            }
        }
        let mut cached = slot
            .history
            .as_ref()
            .filter(|h| h.same_shape(&empty) && !rescore)
            .map(|h| (**h).clone());
        let before = cached.clone();
        let mut track = scoring.then(|| match slot.live.take() {
            Some(l) if !rescore => l,
            _ => LiveTrack {
                version,
                data_to: forecaster.meta.data.to,
                errors: Default::default(),
                window: self.live_window,
            },
        });
        let read = refresh_history(
            db,
            &self.ticker,
            self.interval,
            &mut cached,
            empty,
            track.as_mut().map(|t| (t, forecaster)),
        )
        .await;
        if scoring {
            slot.live = track;
        }
        if let Err(e) = read {
            slot.history = None;
            slot.fetched = None;
            return Err(e);
        }
        if cached != before || slot.history.is_none() {
            slot.generation += 1;
            slot.history = cached.map(Arc::new);
        }
        slot.fetched = Some(Instant::now());
        let h = slot.history.clone().expect("refreshed");
        Ok((h, slot.generation))
    }

    /// The served version's live error as scored so far (`None` before a
    /// bar after its training data was stored and scored).
    pub async fn live(&self) -> Option<LiveScore> {
        let slot = self.history.lock().await;
        let l = slot.live.as_ref()?;
        let (through, _) = *l.errors.back()?;
        let mse = l.errors.iter().map(|(_, e)| e).sum::<f64>() / l.errors.len() as f64;
        Some(LiveScore {
            version: l.version,
            bars: l.errors.len(),
            rmse: mse.sqrt(),
            through,
        })
    }

    /// Answers one forecast request (see the module header).
    pub async fn forecast(
        self: &Arc<Self>,
        db: &Db,
        limits: &Arc<Limits>,
        n_steps: usize,
    ) -> Result<ForecastResponse, ServeError> {
        let cfg = &limits.cfg;
        let _admitted = self.admit(limits)?;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(cfg.request_timeout_ms);
        let served = self.served().ok_or_else(|| self.not_serving())?;
        let (history, generation) = tokio::time::timeout_at(
            deadline,
            self.history(
                db,
                &served.forecaster,
                Duration::from_millis(cfg.history_refresh_ms),
            ),
        )
        .await
        .map_err(|_| self.timed_out(cfg))?
        .map_err(|e| ServeError::Unavailable(e.to_string()))?;
        let Some((last_ts, last)) = history.last() else {
            return Err(ServeError::NotFound(format!(
                "no data for {} {}",
                self.ticker, self.interval
            )));
        };
        let key = (served.info.version, generation);
        let mut joins = 0;
        let points = 'join: loop {
            joins += 1;
            let mut rx = self
                .join_flight(&Want {
                    key,
                    served: &served,
                    history: &history,
                    n_steps,
                    limits,
                })
                .await;
            loop {
                let now = rx.borrow_and_update().clone();
                match now {
                    Progress::Running(p) | Progress::Done(p) if p.len() >= n_steps => {
                        break 'join p[..n_steps].to_vec()
                    }
                    Progress::Failed(e) => return Err(e),
                    // Stopped short (nobody waited, or this request raised
                    // its target as it finished): join again.
                    Progress::Done(_) | Progress::Abandoned if joins < 3 => continue 'join,
                    Progress::Done(_) | Progress::Abandoned => {
                        return Err(ServeError::Internal(
                            "the forecast flights this request joined stopped three times".into(),
                        ))
                    }
                    Progress::Running(_) => {}
                }
                match tokio::time::timeout_at(deadline, rx.changed()).await {
                    Err(_) => return Err(self.timed_out(cfg)),
                    // The flight is gone without a word (it was abandoned).
                    Ok(Err(_)) if joins < 3 => continue 'join,
                    Ok(Err(_)) => {
                        return Err(ServeError::Internal(
                            "a forecast flight stopped without an answer".into(),
                        ))
                    }
                    Ok(Ok(())) => {}
                }
            }
        };
        Ok(ForecastResponse {
            ticker: self.ticker.clone(),
            interval: self.interval,
            model: served.info.clone(),
            last_ts,
            last_close: last.c,
            forecasts: points,
        })
    }

    fn admit<'a>(&'a self, limits: &'a Limits) -> Result<Admitted<'a>, ServeError> {
        let cfg = &limits.cfg;
        let model = self.inflight.fetch_add(1, Ordering::Relaxed) + 1;
        let node = limits.inflight.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!("tickmesh_forecast_inflight").increment(1.0);
        let admitted = Admitted {
            counters: [&self.inflight, &limits.inflight],
        };
        if model > cfg.max_per_model {
            return Err(ServeError::TooMany {
                message: format!(
                    "{} {} has {} forecast requests in flight (max_per_model {})",
                    self.ticker,
                    self.interval,
                    model - 1,
                    cfg.max_per_model
                ),
                retry_after: 1,
            });
        }
        if node > cfg.max_queue {
            return Err(ServeError::Overloaded {
                message: format!(
                    "this node has {} forecast requests in flight (max_queue {})",
                    node - 1,
                    cfg.max_queue
                ),
                retry_after: 1,
            });
        }
        Ok(admitted)
    }

    fn timed_out(&self, cfg: &ServeConfig) -> ServeError {
        ServeError::Overloaded {
            message: format!(
                "the forecast for {} {} was not ready within {} ms",
                self.ticker, self.interval, cfg.request_timeout_ms
            ),
            retry_after: 1,
        }
    }

    /// 503 while nothing is served: loading, retrying, or every version refused.
    fn not_serving(&self) -> ServeError {
        let st = self.status();
        let (t, i) = (&self.ticker, self.interval);
        let message = if let Some(r) = &st.retry {
            format!(
                "the model for {t} {i} is not loaded: v{} failed {} time(s) ({}); next try at {}",
                r.version,
                r.attempts,
                r.last_error,
                r.next_at.to_rfc3339()
            )
        } else if let (None, Some(r)) = (st.loading, st.refused.last()) {
            format!(
                "no servable model for {t} {i}: v{} was refused ({})",
                r.version, r.reason
            )
        } else {
            format!("the model for {t} {i} is still loading")
        };
        ServeError::Loading {
            message,
            retry_after: 2,
        }
    }

    /// A receiver of the flight computing `w.key` far enough for
    /// `w.n_steps`: the finished trajectory, the running flight (raised to
    /// `n_steps`), or a new flight.
    async fn join_flight(self: &Arc<Self>, w: &Want<'_>) -> watch::Receiver<Progress> {
        if !w.limits.cfg.coalesce {
            return self.start_flight(w).0;
        }
        let mut f = self.flights.lock().await;
        if let Some((k, points)) = &f.done {
            if *k == w.key && points.len() >= w.n_steps {
                metrics::counter!("tickmesh_forecast_shared_total", "how" => "finished")
                    .increment(1);
                let (_, rx) = watch::channel(Progress::Done(points.clone()));
                return rx;
            }
        }
        if let Some(running) = f.running.as_ref().filter(|r| r.key == w.key) {
            // A flight that fails or is abandoned now still answers this
            // receiver (Failed, Abandoned), under the same lock.
            running.target.fetch_max(w.n_steps, Ordering::Relaxed);
            metrics::counter!("tickmesh_forecast_shared_total", "how" => "running").increment(1);
            return running.tx.subscribe();
        }
        let (rx, flight) = self.start_flight(w);
        f.running = Some(flight);
        rx
    }

    fn start_flight(self: &Arc<Self>, w: &Want<'_>) -> (watch::Receiver<Progress>, Flight) {
        let (tx, rx) = watch::channel(Progress::Running(Arc::new(Vec::new())));
        let tx = Arc::new(tx);
        let target = Arc::new(AtomicUsize::new(w.n_steps));
        let key = w.key;
        let flight = Flight {
            key,
            target: target.clone(),
            tx: tx.clone(),
        };
        let (me, served, history, limits) = (
            self.clone(),
            w.served.clone(),
            w.history.clone(),
            w.limits.clone(),
        );
        tokio::spawn(async move {
            let outcome = fly(&me, &served, &history, &target, &tx, &limits).await;
            match outcome {
                Ok(points) => {
                    let mut f = me.flights.lock().await;
                    if limits.cfg.coalesce {
                        f.done = Some((key, points.clone()));
                    }
                    if f.running.as_ref().is_some_and(|r| Arc::ptr_eq(&r.tx, &tx)) {
                        f.running = None;
                    }
                    // A request that joined as the flight finished may want
                    // more: it joins again (and shorter ones find `done`).
                    if target.load(Ordering::Relaxed) > points.len() {
                        tx.send_replace(Progress::Abandoned);
                    } else {
                        tx.send_replace(Progress::Done(points));
                    }
                }
                Err(None) => {
                    metrics::counter!("tickmesh_forecast_cancelled_total").increment(1);
                    let mut f = me.flights.lock().await;
                    if f.running.as_ref().is_some_and(|r| Arc::ptr_eq(&r.tx, &tx)) {
                        f.running = None;
                    }
                    // Whoever joined since the flight looked: start anew.
                    tx.send_replace(Progress::Abandoned);
                }
                Err(Some(e)) => {
                    let mut f = me.flights.lock().await;
                    if f.running.as_ref().is_some_and(|r| Arc::ptr_eq(&r.tx, &tx)) {
                        f.running = None;
                    }
                    tx.send_replace(Progress::Failed(e));
                }
            }
        });
        (rx, flight)
    }
}

/// Runs a flight to its target; `Err(None)` when nobody waits any more.
async fn fly(
    me: &ModelHandle,
    served: &Arc<Served>,
    history: &Arc<History>,
    target: &AtomicUsize,
    tx: &watch::Sender<Progress>,
    limits: &Limits,
) -> Result<Arc<Vec<ForecastPoint>>, Option<ServeError>> {
    let mut state = Some(((**history).clone(), Vec::new()));
    loop {
        let (h, points) = state.take().expect("a state between chunks");
        let want = target.load(Ordering::Relaxed);
        if points.len() >= want {
            return Ok(Arc::new(points));
        }
        if tx.receiver_count() == 0 {
            return Err(None);
        }
        // A flight whose waiters all leave while it queues leaves the queue.
        let _slot = tokio::select! {
            slot = limits.compute.acquire() => slot.expect("the compute semaphore is never closed"),
            _ = tx.closed() => return Err(None),
        };
        let steps = CHUNK.min(want - points.len());
        let s = served.clone();
        let ticker = me.ticker.clone();
        let chunk = tokio::task::spawn_blocking(move || {
            failpoint_panic(&ticker);
            let (mut h, mut points) = (h, points);
            let mut scratch = Scratch::default();
            let started = Instant::now();
            for _ in 0..steps {
                match s.forecaster.step(&mut h, &mut scratch) {
                    Ok(p) => points.push(p),
                    Err(e) => return Err(e),
                }
            }
            metrics::histogram!("tickmesh_forecast_compute_seconds")
                .record(started.elapsed().as_secs_f64());
            Ok((h, points))
        })
        .await;
        match chunk {
            Ok(Ok((h, points))) => {
                metrics::counter!("tickmesh_forecast_steps_total", "ticker" => me.ticker.clone(), "interval" => me.interval.to_string())
                    .increment(steps as u64);
                tx.send_replace(Progress::Running(Arc::new(points.clone())));
                state = Some((h, points));
            }
            Ok(Err(e)) => return Err(Some(ServeError::Unavailable(e.to_string()))),
            Err(e) if e.is_panic() => {
                let what = panic_text(e.into_panic());
                tracing::error!(ticker = %me.ticker, interval = %me.interval, panic = %what, "a forecast panicked");
                metrics::counter!("tickmesh_forecast_panics_total").increment(1);
                return Err(Some(ServeError::Internal(format!(
                    "the forecast for {} {} failed: {what}",
                    me.ticker, me.interval
                ))));
            }
            Err(e) => return Err(Some(ServeError::Internal(e.to_string()))),
        }
    }
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// Failpoint: `TICKMESH_FAILPOINT_FORECAST_PANIC=TICKER:N` makes the first
/// N forecast chunks of TICKER in this process panic (the tests' injected fault).
fn failpoint_panic(ticker: &str) {
    static LEFT: AtomicU64 = AtomicU64::new(u64::MAX);
    let Ok(v) = std::env::var("TICKMESH_FAILPOINT_FORECAST_PANIC") else {
        return;
    };
    let Some((t, n)) = v.split_once(':') else {
        return;
    };
    if t != ticker {
        return;
    }
    let n: u64 = n.parse().unwrap_or(0);
    let _ = LEFT.compare_exchange(u64::MAX, n, Ordering::Relaxed, Ordering::Relaxed);
    if LEFT
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(1))
        .is_ok()
    {
        panic!("failpoint: an injected panic in the forecast of {ticker}");
    }
}

/// Brings a cached history up to date with `aggregated_data`: the rows from
/// the cached last bar on are read again; when that bar was rewritten (a
/// re-aggregation revised it) or the row count says earlier rows changed,
/// the history is rebuilt from every stored row. With `score`, each stored
/// bar after the version's training data that is pushed (the last `window`
/// of them in a rebuild) is first predicted from the history before it,
/// and the error recorded.
async fn refresh_history(
    db: &Db,
    ticker: &str,
    interval: Interval,
    cache: &mut Option<History>,
    empty: History,
    mut score: Option<(&mut LiveTrack, &Forecaster)>,
) -> tickmesh_core::Result<()> {
    let columns = empty.columns();
    let mut scratch = Scratch::default();
    let mut push = |h: &mut History,
                    r: &tickmesh_core::types::AggRow,
                    scored: bool,
                    score: &mut Option<(&mut LiveTrack, &Forecaster)>|
     -> tickmesh_core::Result<()> {
        if let Some((track, f)) = score.as_mut() {
            if scored && r.ts > track.data_to {
                let actual = tickmesh_features::Ohlcv::of_row(&r.values).map(|b| b.c);
                // Too little history, or undefined features: not scored.
                if let (Ok(p), Some(c)) = (f.next_close(h, &mut scratch), actual) {
                    track.push(r.ts, p - c);
                }
            }
        }
        h.push_stored(r)
    };
    if let Some(h) = cache.as_mut().filter(|h| h.same_shape(&empty)) {
        if let (Some((t, _)), Some(kept)) = (h.last(), h.last_row().map(<[_]>::to_vec)) {
            let rows = db
                .read_aggregated(
                    ticker,
                    interval,
                    &columns,
                    Some(t - chrono::Duration::microseconds(1)),
                )
                .await?;
            let same_last = rows
                .first()
                .is_some_and(|r| r.ts == t && r.values.as_slice() == kept.as_slice());
            let stored = db.count_aggregated(ticker, interval).await?;
            if same_last && stored as u64 == h.bars() + rows.len() as u64 - 1 {
                for r in &rows[1..] {
                    push(h, r, true, &mut score)?;
                }
                return Ok(());
            }
        }
    }
    let rows = db.read_aggregated(ticker, interval, &columns, None).await?;
    let mut h = empty;
    if let Some((track, _)) = score.as_mut() {
        track.errors.clear();
    }
    let window = score.as_ref().map_or(0, |(t, _)| t.window);
    let first_scored = rows.len().saturating_sub(window);
    for (i, r) in rows.iter().enumerate() {
        push(&mut h, r, i >= first_scored, &mut score)?;
    }
    *cache = Some(h);
    Ok(())
}

/// The node's model handles, shared by the predictor registry (which adds
/// them and outlives none of them: a restarted registry finds them again, so
/// serving goes on while predictors restart) and the HTTP layer, and the
/// stream of their events.
#[derive(Clone)]
pub struct Table(
    Arc<RwLock<Handles>>,
    tokio::sync::broadcast::Sender<ModelEvent>,
    /// Bars each model's live error is measured on.
    usize,
);

impl Default for Table {
    fn default() -> Self {
        Table::new(tickmesh_core::config::RetrainConfig::default().drift_bars)
    }
}

type Handles = BTreeMap<(String, Interval), Arc<ModelHandle>>;

impl Table {
    /// An empty table whose models measure their live error on the last
    /// `live_window` bars (`[retrain] drift_bars`).
    pub fn new(live_window: usize) -> Self {
        Table(
            Arc::default(),
            tokio::sync::broadcast::channel(256).0,
            live_window.max(1),
        )
    }

    /// The handle of (ticker, interval), if a version was ever announced for it.
    pub fn get(&self, ticker: &str, interval: Interval) -> Option<Arc<ModelHandle>> {
        // Nothing panics while the lock is held (a clone, an insert), so
        // a poisoned lock still holds a consistent map.
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(ticker.to_string(), interval))
            .cloned()
    }

    /// The handle of (ticker, interval), created on first use.
    pub fn get_or_create(&self, ticker: &str, interval: Interval) -> Arc<ModelHandle> {
        if let Some(h) = self.get(ticker, interval) {
            return h;
        }
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry((ticker.to_string(), interval))
            .or_insert_with(|| ModelHandle::new(ticker, interval, self.1.clone(), self.2))
            .clone()
    }

    /// The events of every model from now on.
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<ModelEvent> {
        self.1.subscribe()
    }

    /// Every handle, by ticker and interval.
    pub fn all(&self) -> Vec<Arc<ModelHandle>> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}
