//! Supervision as OTP does it, on ractor actors.
//!
//! - [`RestartBudget`]: at most `max_restarts` restarts in `window_secs`
//!   (OTP's intensity/period), with a jittered, doubling backoff.
//! - [`Supervisor`]: an actor that starts its children in order from
//!   [`ChildSpec`]s and, when one exits, restarts by its [`Strategy`]:
//!   `one_for_one` (that child), `one_for_all` (every child, stopped in
//!   reverse order first) or `rest_for_one` (that child and those started
//!   after it). The backoff is a timer (`send_after`), never a sleep in a
//!   handler; a failure while a restart waits joins it, so the children
//!   still start together and in order. When the budget is spent the supervisor fails with the reason
//!   (escalation): its own parent decides, and a node whose root supervisor
//!   fails exits non-zero.
//! - [`metrics`]: restart and escalation counts of every supervisor in the
//!   process, rendered for `/metrics`.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tracing::{error, warn};

use tickmesh_core::config::{Strategy, SupervisionConfig};

/// The child and the reason when a supervision event says a child stopped
/// (failed, or terminated); `None` for other events.
pub fn stopped_child(evt: &SupervisionEvent) -> Option<(ActorId, String)> {
    match evt {
        SupervisionEvent::ActorFailed(cell, err) => Some((cell.get_id(), err.to_string())),
        SupervisionEvent::ActorTerminated(cell, _, reason) => Some((
            cell.get_id(),
            reason.clone().unwrap_or_else(|| "stopped".into()),
        )),
        _ => None,
    }
}

#[derive(Debug, Clone)]
pub struct RestartBudget {
    cfg: SupervisionConfig,
    restarts: VecDeque<Instant>,
}

impl RestartBudget {
    pub fn new(cfg: SupervisionConfig) -> Self {
        RestartBudget {
            cfg,
            restarts: VecDeque::new(),
        }
    }

    /// Records a restart now; `Some(backoff)` to wait before it, `None` when
    /// the budget is spent.
    pub fn allow(&mut self) -> Option<Duration> {
        let now = Instant::now();
        let window = Duration::from_secs(self.cfg.window_secs);
        while self
            .restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            self.restarts.pop_front();
        }
        if self.restarts.len() as u32 >= self.cfg.max_restarts {
            return None;
        }
        self.restarts.push_back(now);
        let n = self.restarts.len() as u32;
        let base = self.cfg.backoff_ms.saturating_mul(1 << (n - 1).min(6));
        let jitter = rand::random::<u64>() % (base / 2 + 1);
        Some(Duration::from_millis(base + jitter))
    }
}

/// Restart and escalation counts per supervisor (and child), process-wide.
#[derive(Default)]
pub struct SupervisionMetrics {
    restarts: Mutex<BTreeMap<(String, String), u64>>,
    escalations: Mutex<BTreeMap<String, u64>>,
    last: Mutex<BTreeMap<String, String>>,
}

/// The process's supervision counters.
pub fn metrics() -> &'static SupervisionMetrics {
    static M: OnceLock<SupervisionMetrics> = OnceLock::new();
    M.get_or_init(SupervisionMetrics::default)
}

impl SupervisionMetrics {
    pub fn restarted(&self, supervisor: &str, child: &str) {
        metrics::counter!("tickmesh_supervisor_restarts_total", "supervisor" => supervisor.to_string(), "child" => child.to_string()).increment(1);
        *self
            .restarts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((supervisor.to_string(), child.to_string()))
            .or_default() += 1;
    }

    pub fn escalated(&self, supervisor: &str, reason: &str) {
        metrics::counter!("tickmesh_supervisor_escalations_total", "supervisor" => supervisor.to_string()).increment(1);
        *self
            .escalations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(supervisor.to_string())
            .or_default() += 1;
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(supervisor.to_string(), reason.to_string());
    }

    /// Why `supervisor` last gave up.
    pub fn last_escalation(&self, supervisor: &str) -> Option<String> {
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(supervisor)
            .cloned()
    }

    /// Restarts of `child` under `supervisor` so far.
    pub fn restarts(&self, supervisor: &str, child: &str) -> u64 {
        self.restarts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(supervisor.to_string(), child.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Escalations of `supervisor` so far.
    pub fn escalations(&self, supervisor: &str) -> u64 {
        self.escalations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(supervisor)
            .copied()
            .unwrap_or(0)
    }
}

type StartFuture = Pin<Box<dyn Future<Output = Result<ActorCell, ActorProcessingErr>> + Send>>;

/// How to start (and restart) one child: a name, and a function that spawns
/// it linked to the supervisor cell it is given.
#[derive(Clone)]
pub struct ChildSpec {
    pub name: String,
    start: Arc<dyn Fn(ActorCell) -> StartFuture + Send + Sync>,
}

impl ChildSpec {
    pub fn new<F, Fut>(name: impl Into<String>, start: F) -> Self
    where
        F: Fn(ActorCell) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<ActorCell, ActorProcessingErr>> + Send + 'static,
    {
        ChildSpec {
            name: name.into(),
            start: Arc::new(move |sup| Box::pin(start(sup))),
        }
    }

    /// A child that is a ractor actor spawned with `args()` each time.
    pub fn actor<A, F>(name: impl Into<String>, actor: A, args: F) -> Self
    where
        A: Actor + Clone + Sync,
        F: Fn() -> A::Arguments + Send + Sync + 'static,
    {
        ChildSpec::actor_in(name, actor, args, None)
    }

    /// The same, publishing each incarnation in `slot` for those that call it.
    pub fn actor_in<A, F>(
        name: impl Into<String>,
        actor: A,
        args: F,
        slot: Option<Slot<A::Msg>>,
    ) -> Self
    where
        A: Actor + Clone + Sync,
        F: Fn() -> A::Arguments + Send + Sync + 'static,
    {
        ChildSpec::new(name, move |sup: ActorCell| {
            let (actor, args, slot) = (actor.clone(), args(), slot.clone());
            async move {
                let (r, _) = Actor::spawn_linked(None, actor, args, sup).await?;
                if let Some(s) = slot {
                    s.set(r.clone());
                }
                Ok(r.get_cell())
            }
        })
    }
}

/// The current incarnation of a supervised actor, for those that call it:
/// its start function sets it, so callers never hold a reference to an
/// instance that a restart replaced.
pub struct Slot<M: ractor::Message>(Arc<std::sync::RwLock<Option<ActorRef<M>>>>);

impl<M: ractor::Message> Clone for Slot<M> {
    fn clone(&self) -> Self {
        Slot(self.0.clone())
    }
}

impl<M: ractor::Message> Default for Slot<M> {
    fn default() -> Self {
        Slot(Arc::new(std::sync::RwLock::new(None)))
    }
}

impl<M: ractor::Message> Slot<M> {
    /// A slot holding `r`.
    pub fn of(r: ActorRef<M>) -> Self {
        let s = Slot::default();
        s.set(r);
        s
    }

    pub fn set(&self, r: ActorRef<M>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(r);
    }

    /// The current instance; `None` before the first start.
    pub fn get(&self) -> Option<ActorRef<M>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

type ServerFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
type ShutdownFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A server (gRPC, HTTP) or a long-running task as a supervised child: the
/// actor runs `run(shutdown)` and fails when it returns before being
/// stopped, so its supervisor restarts it like any other child. Stopping
/// the actor resolves `shutdown` and waits (up to 10 s) for the server to
/// let go of its port.
#[derive(Clone, Copy)]
pub struct ServerActor;

#[derive(Clone)]
pub struct ServerArgs {
    pub name: String,
    pub run: Arc<dyn Fn(ShutdownFuture) -> ServerFuture + Send + Sync>,
}

impl ServerArgs {
    pub fn new<F, Fut>(name: impl Into<String>, run: F) -> Self
    where
        F: Fn(ShutdownFuture) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        ServerArgs {
            name: name.into(),
            run: Arc::new(move |sd| Box::pin(run(sd))),
        }
    }
}

/// Messages of [`ServerActor`].
pub enum ServerMsg {
    /// The server returned on its own (why).
    Ended(String),
}

impl ractor::Message for ServerMsg {}

pub struct ServerState {
    name: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// The server itself: aborted when it outlives its shutdown (or the
    /// actor dies without `post_stop`), so a restart can bind its port.
    server: tokio::task::AbortHandle,
}

impl Drop for ServerState {
    fn drop(&mut self) {
        self.server.abort();
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

impl Actor for ServerActor {
    type Msg = ServerMsg;
    type State = ServerState;
    type Arguments = ServerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ServerMsg>,
        args: ServerArgs,
    ) -> Result<ServerState, ActorProcessingErr> {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown: ShutdownFuture = Box::pin(async move {
            let _ = rx.await;
        });
        let server = tokio::spawn((args.run)(shutdown));
        let abort = server.abort_handle();
        let task = tokio::spawn(async move {
            let why = match server.await {
                Ok(Ok(())) => "it returned".to_string(),
                Ok(Err(e)) => e,
                Err(e) => format!("it panicked: {e}"),
            };
            let _ = myself.cast(ServerMsg::Ended(why));
        });
        Ok(ServerState {
            name: args.name,
            shutdown: Some(tx),
            task: Some(task),
            server: abort,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<ServerMsg>,
        msg: ServerMsg,
        st: &mut ServerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ServerMsg::Ended(why) => {
                st.task = None;
                Err(format!("the {} server stopped: {why}", st.name).into())
            }
        }
    }

    async fn post_stop(
        &self,
        _: ActorRef<ServerMsg>,
        st: &mut ServerState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(tx) = st.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = st.task.take() {
            if tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .is_err()
            {
                warn!(server = %st.name, "did not stop within 10 s; aborted");
            }
        }
        st.server.abort();
        Ok(())
    }
}

/// See the module doc.
#[derive(Clone, Copy)]
pub struct Supervisor;

#[derive(Clone)]
pub struct SupervisorArgs {
    /// Names the supervisor in logs and metrics.
    pub name: String,
    pub policy: SupervisionConfig,
    /// Started in this order; stopped in the reverse.
    pub children: Vec<ChildSpec>,
}

/// Messages of [`Supervisor`].
pub enum SupervisorMsg {
    /// The backoff has passed: start the pending children again, in order
    /// (only the latest generation's timer does).
    Restart(u64),
    /// The children now running, by name (for tests and `/metrics`).
    Children(ractor::RpcReplyPort<Vec<(String, Option<ActorCell>)>>),
}

impl ractor::Message for SupervisorMsg {}

pub struct SupervisorState {
    name: String,
    strategy: Strategy,
    budget: RestartBudget,
    specs: Vec<ChildSpec>,
    cells: Vec<Option<ActorCell>>,
    /// Children this supervisor stopped itself (their exits are not failures).
    stopping: HashSet<ActorId>,
    /// Stopped siblings to wait for before their replacements start.
    draining: Vec<ActorCell>,
    /// Children waiting to be started again, and the generation of the one
    /// `Restart` timer that may start them (older timers are ignored).
    pending: std::collections::BTreeSet<usize>,
    generation: u64,
}

impl SupervisorState {
    /// Handles the exit of child `i`: schedules the restarts the strategy
    /// asks for, or escalates (Err) when the budget is spent.
    fn child_exited(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        i: usize,
        why: &str,
    ) -> Result<(), ActorProcessingErr> {
        let child = self.specs[i].name.clone();
        self.cells[i] = None;
        let Some(backoff) = self.budget.allow() else {
            let reason = format!(
                "supervisor `{}`: child `{child}` exited more than {} times within {} s; the last: {why}",
                self.name, self.budget.cfg.max_restarts, self.budget.cfg.window_secs
            );
            metrics().escalated(&self.name, &reason);
            error!(supervisor = %self.name, %child, reason = %why, "restart budget spent; escalating");
            // A failed supervisor leaves no child behind.
            for c in self.cells.iter_mut().rev().filter_map(Option::take) {
                c.stop(Some("its supervisor gave up".into()));
            }
            return Err(reason.into());
        };
        let set: Vec<usize> = match self.strategy {
            Strategy::OneForOne => vec![i],
            Strategy::OneForAll => (0..self.specs.len()).collect(),
            Strategy::RestForOne => (i..self.specs.len()).collect(),
        };
        for &j in set.iter().rev() {
            if let Some(c) = self.cells[j].take() {
                self.stopping.insert(c.get_id());
                c.stop(Some(format!(
                    "restarted with `{child}` ({:?})",
                    self.strategy
                )));
                self.draining.push(c);
            }
        }
        for &j in &set {
            metrics().restarted(&self.name, &self.specs[j].name);
        }
        warn!(supervisor = %self.name, %child, reason = %why, strategy = ?self.strategy, restarting = set.len(), backoff_ms = backoff.as_millis() as u64, "child exited; restarting");
        // One pending set: a failure while a restart waits merges into it,
        // and the children then start together, in order.
        self.pending.extend(set);
        self.generation += 1;
        let g = self.generation;
        myself.send_after(backoff, move || SupervisorMsg::Restart(g));
        Ok(())
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut cells = Vec::new();
        for spec in &args.children {
            let cell = (spec.start)(myself.get_cell())
                .await
                .map_err(|e| format!("supervisor `{}`: start `{}`: {e}", args.name, spec.name))?;
            cells.push(Some(cell));
        }
        Ok(SupervisorState {
            name: args.name,
            strategy: args.policy.strategy,
            budget: RestartBudget::new(args.policy),
            specs: args.children,
            cells,
            stopping: HashSet::new(),
            draining: Vec::new(),
            pending: Default::default(),
            generation: 0,
        })
    }

    async fn post_stop(
        &self,
        _: ActorRef<Self::Msg>,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        for c in st.cells.iter().rev().flatten() {
            let _ = c.stop_and_wait(None, Some(Duration::from_secs(10))).await;
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Restart(g) => {
                if g != st.generation {
                    return Ok(());
                }
                // Replacements start only once the stopped children are gone
                // (they may hold ports or names). Each was told to stop when
                // the restart was scheduled; this waits out its `post_stop`.
                for c in std::mem::take(&mut st.draining) {
                    let _ = c.wait(Some(Duration::from_secs(10))).await;
                }
                let set: Vec<usize> = std::mem::take(&mut st.pending).into_iter().collect();
                for (k, &j) in set.iter().enumerate() {
                    if st.cells[j].is_some() {
                        continue;
                    }
                    match (st.specs[j].start)(myself.get_cell()).await {
                        Ok(c) => st.cells[j] = Some(c),
                        Err(e) => {
                            // The rest wait for the next attempt with this one.
                            st.pending.extend(&set[k + 1..]);
                            let why = format!("restart failed: {e}");
                            return st.child_exited(&myself, j, &why);
                        }
                    }
                }
            }
            SupervisorMsg::Children(reply) => {
                let out = st
                    .specs
                    .iter()
                    .zip(&st.cells)
                    .map(|(s, c)| (s.name.clone(), c.clone()))
                    .collect();
                let _ = reply.send(out);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let Some((id, why)) = stopped_child(&evt) else {
            return Ok(());
        };
        if st.stopping.remove(&id) {
            return Ok(());
        }
        let Some(i) = st
            .cells
            .iter()
            .position(|c| c.as_ref().is_some_and(|c| c.get_id() == id))
        else {
            return Ok(());
        };
        st.child_exited(&myself, i, &why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_spent_after_max_restarts() {
        let mut b = RestartBudget::new(SupervisionConfig {
            max_restarts: 2,
            backoff_ms: 1,
            ..Default::default()
        });
        assert!(b.allow().is_some());
        assert!(b.allow().is_some());
        assert!(b.allow().is_none());
    }
}

#[cfg(test)]
mod strategy_tests {
    use super::*;
    use ractor::call_t;

    /// A child that logs its starts and panics when told to, or at once
    /// when `always_fails`.
    #[derive(Clone)]
    struct Flaky {
        name: &'static str,
        log: Arc<Mutex<Vec<String>>>,
        always_fails: bool,
    }

    enum FlakyMsg {
        Panic,
    }

    impl ractor::Message for FlakyMsg {}

    impl Actor for Flaky {
        type Msg = FlakyMsg;
        type State = ();
        type Arguments = ();

        async fn pre_start(&self, _: ActorRef<FlakyMsg>, _: ()) -> Result<(), ActorProcessingErr> {
            let me = format!("start {}", self.name);
            let n = {
                let mut log = self.log.lock().unwrap();
                log.push(me.clone());
                log.iter().filter(|l| **l == me).count()
            };
            // `always_fails`: its first start panics in post_start; after
            // that it cannot start at all.
            if self.always_fails && n > 1 {
                return Err(format!("{} cannot start", self.name).into());
            }
            Ok(())
        }

        async fn post_start(
            &self,
            _: ActorRef<FlakyMsg>,
            _: &mut (),
        ) -> Result<(), ActorProcessingErr> {
            if self.always_fails {
                panic!("{} fails at once", self.name);
            }
            Ok(())
        }

        async fn handle(
            &self,
            _: ActorRef<FlakyMsg>,
            msg: FlakyMsg,
            _: &mut (),
        ) -> Result<(), ActorProcessingErr> {
            match msg {
                FlakyMsg::Panic => panic!("{} was told to panic", self.name),
            }
        }
    }

    fn policy(strategy: Strategy) -> SupervisionConfig {
        SupervisionConfig {
            strategy,
            max_restarts: 3,
            window_secs: 10,
            backoff_ms: 10,
        }
    }

    async fn start(
        name: &str,
        strategy: Strategy,
        fails: Option<&'static str>,
    ) -> (
        ActorRef<SupervisorMsg>,
        tokio::task::JoinHandle<()>,
        Arc<Mutex<Vec<String>>>,
    ) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let children = ["a", "b", "c"]
            .into_iter()
            .map(|n| {
                let f = Flaky {
                    name: n,
                    log: log.clone(),
                    always_fails: fails == Some(n),
                };
                ChildSpec::actor(n, f, || ())
            })
            .collect();
        let (sup, h) = Actor::spawn(
            None,
            Supervisor,
            SupervisorArgs {
                name: name.into(),
                policy: policy(strategy),
                children,
            },
        )
        .await
        .unwrap();
        (sup, h, log)
    }

    async fn child(sup: &ActorRef<SupervisorMsg>, name: &str) -> Option<ActorCell> {
        call_t!(sup, SupervisorMsg::Children, 1000)
            .unwrap()
            .into_iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, c)| c)
    }

    /// Panics `b` and waits until every child runs again; the starts after
    /// the first three.
    async fn restarts_after_b_panics(
        name: &str,
        strategy: Strategy,
    ) -> (Vec<String>, ActorRef<SupervisorMsg>) {
        let (sup, _h, log) = start(name, strategy, None).await;
        let b: ActorRef<FlakyMsg> = child(&sup, "b").await.unwrap().into();
        let before: Vec<ActorId> = {
            let mut v = Vec::new();
            for n in ["a", "b", "c"] {
                v.push(child(&sup, n).await.unwrap().get_id());
            }
            v
        };
        b.cast(FlakyMsg::Panic).unwrap();
        let start = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let mut all = true;
            let mut changed = 0;
            for (k, n) in ["a", "b", "c"].into_iter().enumerate() {
                match child(&sup, n).await {
                    Some(c) if c.get_status() == ractor::ActorStatus::Running => {
                        changed += usize::from(c.get_id() != before[k]);
                    }
                    _ => all = false,
                }
            }
            if all && changed > 0 {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(5), "never restarted");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let starts = log.lock().unwrap()[3..].to_vec();
        (starts, sup)
    }

    #[tokio::test]
    async fn one_for_one_restarts_only_the_child_that_failed() {
        let (starts, sup) = restarts_after_b_panics("t-one", Strategy::OneForOne).await;
        assert_eq!(starts, vec!["start b"]);
        assert_eq!(metrics().restarts("t-one", "b"), 1);
        assert_eq!(metrics().restarts("t-one", "a"), 0);
        sup.stop(None);
    }

    #[tokio::test]
    async fn one_for_all_restarts_every_child_in_order() {
        let (starts, sup) = restarts_after_b_panics("t-all", Strategy::OneForAll).await;
        assert_eq!(starts, vec!["start a", "start b", "start c"]);
        assert_eq!(metrics().restarts("t-all", "a"), 1);
        sup.stop(None);
    }

    #[tokio::test]
    async fn rest_for_one_restarts_the_child_and_those_started_after_it() {
        let (starts, sup) = restarts_after_b_panics("t-rest", Strategy::RestForOne).await;
        assert_eq!(starts, vec!["start b", "start c"]);
        assert_eq!(metrics().restarts("t-rest", "a"), 0);
        assert_eq!(metrics().restarts("t-rest", "c"), 1);
        sup.stop(None);
    }

    #[tokio::test]
    async fn a_child_failing_in_a_loop_is_restarted_within_its_budget_then_escalates() {
        crate::telemetry::install();
        // A parent that records how its child supervisor ended.
        struct Parent(Arc<Mutex<Option<String>>>);
        impl Actor for Parent {
            type Msg = ();
            type State = ();
            type Arguments = ();
            async fn pre_start(&self, _: ActorRef<()>, _: ()) -> Result<(), ActorProcessingErr> {
                Ok(())
            }
            async fn handle_supervisor_evt(
                &self,
                _: ActorRef<()>,
                evt: SupervisionEvent,
                _: &mut (),
            ) -> Result<(), ActorProcessingErr> {
                if let SupervisionEvent::ActorFailed(_, e) = evt {
                    *self.0.lock().unwrap() = Some(e.to_string());
                }
                Ok(())
            }
        }
        let seen = Arc::new(Mutex::new(None));
        let (parent, _) = Actor::spawn(None, Parent(seen.clone()), ()).await.unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let looping = Flaky {
            name: "looping",
            log: log.clone(),
            always_fails: false,
        };
        let (sup, h) = Actor::spawn_linked(
            None,
            Supervisor,
            SupervisorArgs {
                name: "t-escalate".into(),
                policy: policy(Strategy::OneForOne),
                children: vec![ChildSpec::actor("looping", looping, || ())],
            },
            parent.get_cell(),
        )
        .await
        .unwrap();
        let t0 = Instant::now();
        // Panic it as soon as each incarnation runs: a crash loop.
        let crash = tokio::spawn({
            let sup = sup.clone();
            async move {
                loop {
                    if let Ok(Some(c)) = call_t!(sup, SupervisorMsg::Children, 1000)
                        .map(|v| v.into_iter().next().and_then(|(_, c)| c))
                    {
                        let _ = ActorRef::<FlakyMsg>::from(c).cast(FlakyMsg::Panic);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), h)
            .await
            .expect("the supervisor gave up")
            .unwrap();
        crash.abort();
        let starts = log.lock().unwrap().len();
        assert_eq!(starts, 4, "the first start and max_restarts (3) restarts");
        assert!(
            t0.elapsed() >= Duration::from_millis(10 + 20 + 40),
            "each restart waited its backoff"
        );
        assert_eq!(metrics().restarts("t-escalate", "looping"), 3);
        assert_eq!(metrics().escalations("t-escalate"), 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let why = seen
            .lock()
            .unwrap()
            .clone()
            .expect("the parent saw a failure");
        assert!(why.contains("exited more than 3 times"), "{why}");
        let text = crate::telemetry::render();
        assert!(
            text.contains("tickmesh_supervisor_escalations_total{supervisor=\"t-escalate\"} 1"),
            "{text}"
        );
        assert!(text.contains("# TYPE tickmesh_supervisor_escalations_total counter"));
        assert!(text.contains("# HELP tickmesh_supervisor_escalations_total "));
    }

    #[tokio::test]
    async fn a_child_that_cannot_start_escalates_after_its_budget() {
        let (_sup, h, log) = start("t-start", Strategy::OneForOne, Some("c")).await;
        tokio::time::timeout(Duration::from_secs(10), h)
            .await
            .expect("the supervisor gave up")
            .unwrap();
        let c_starts = log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| *l == "start c")
            .count();
        assert_eq!(c_starts, 4, "one start, then three restarts that fail");
        assert_eq!(metrics().escalations("t-start"), 1);
        let why = metrics().last_escalation("t-start").unwrap();
        assert!(
            why.contains("restart failed") && why.contains("c cannot start"),
            "{why}"
        );
    }
}
