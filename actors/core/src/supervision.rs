//! Restart budgets: at most `max_restarts` restarts in `window_secs`, with a
//! jittered backoff between them (OTP's intensity/period). A supervisor asks
//! its budget before restarting a child; when the budget is spent it stops
//! and its own parent decides.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ractor::{ActorId, SupervisionEvent};

use crate::config::SupervisionConfig;

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
