//! The leases a trainer node holds, one per assigned job, shared by its
//! pool (which renews them with each heartbeat) and its trainers (which
//! check them before every write). A lease is valid until the coordinator's
//! term, counted from when the renewing heartbeat was *sent* and less one
//! heartbeat period of margin, so it always runs out here before it does at
//! the coordinator: once the coordinator may hand the job to another node,
//! this one has stopped writing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
struct Held {
    epoch: i64,
    until: Instant,
}

/// The node's leases.
#[derive(Debug, Clone, Default)]
pub struct Leases {
    held: Arc<Mutex<HashMap<String, Held>>>,
    /// How long a trainer whose lease ran out waits for a renewal (the
    /// coordinator restarting, say) before it gives the job up.
    patience: Arc<Mutex<Duration>>,
}

impl Leases {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets how long [`Leases::wait_valid`] waits for a renewal.
    pub fn set_patience(&self, d: Duration) {
        *self.patience.lock().unwrap_or_else(|p| p.into_inner()) = d;
    }

    /// Like [`Leases::check`], but a lease that ran out while still held is
    /// waited on (writing nothing) for up to the patience, in case a renewal
    /// comes; a revoked or released job fails at once. Blocks the thread:
    /// for the training thread.
    pub fn wait_valid(&self, job: &str, epoch: i64) -> Result<(), String> {
        let patience = *self.patience.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = Instant::now() + patience;
        loop {
            match self.check(job, epoch) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let held = self.map().get(job).is_some_and(|h| h.epoch == epoch);
                    if !held || Instant::now() >= deadline {
                        return Err(e);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// A job was assigned under `epoch`; its lease runs until `until`.
    pub fn grant(&self, job: &str, epoch: i64, until: Instant) {
        self.map().insert(job.to_string(), Held { epoch, until });
    }

    /// The coordinator renewed these jobs' leases until `until`.
    pub fn renew(&self, jobs: &[(String, i64)], until: Instant) {
        let mut m = self.map();
        for (job, epoch) in jobs {
            if let Some(h) = m.get_mut(job).filter(|h| h.epoch == *epoch) {
                h.until = h.until.max(until);
            }
        }
    }

    /// The job is not this node's any more (revoked, or finished).
    pub fn release(&self, job: &str) {
        self.map().remove(job);
    }

    /// The jobs held, with their epochs.
    pub fn held(&self) -> Vec<(String, i64)> {
        let mut v: Vec<_> = self
            .map()
            .iter()
            .map(|(k, h)| (k.clone(), h.epoch))
            .collect();
        v.sort();
        v
    }

    /// `Ok` while the job's lease under `epoch` is valid; the error says why
    /// the trainer must stop writing.
    pub fn check(&self, job: &str, epoch: i64) -> Result<(), String> {
        match self.map().get(job) {
            Some(h) if h.epoch == epoch && Instant::now() < h.until => Ok(()),
            Some(h) if h.epoch == epoch => Err(format!(
                "the lease of job {job} (epoch {epoch}) ran out {:.1} s ago without renewal; nothing more is written",
                h.until.elapsed().as_secs_f64()
            )),
            _ => Err(format!(
                "job {job} (epoch {epoch}) is no longer this node's; nothing more is written"
            )),
        }
    }
}

/// How long a lease granted or renewed at `sent` lasts here: the
/// coordinator's term less one heartbeat period.
pub fn term(sent: Instant, lease: Duration, heartbeat: Duration) -> Instant {
    sent + lease.saturating_sub(heartbeat)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_valid_until_its_term_and_only_for_its_epoch() {
        let l = Leases::default();
        let now = Instant::now();
        l.grant("j", 3, now + Duration::from_secs(60));
        assert!(l.check("j", 3).is_ok());
        assert!(l.check("j", 2).unwrap_err().contains("no longer"));
        l.grant("k", 1, now);
        assert!(l.check("k", 1).unwrap_err().contains("ran out"));
        l.renew(&[("k".into(), 1)], now + Duration::from_secs(60));
        assert!(l.check("k", 1).is_ok());
        l.release("j");
        assert!(l.check("j", 3).is_err());
        assert_eq!(l.held(), vec![("k".to_string(), 1)]);
    }
}
