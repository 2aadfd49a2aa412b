//! Which ingest node reads which partition: leases in the cluster's
//! database (`ingest_members`, `ingest_leases`; SQL in
//! `actors/core/src/db_leases.rs`).
//!
//! The Kafka consumers assign partitions explicitly (tansu 0.6.0's group
//! protocol stalls for minutes after a member is killed, see
//! `KafkaSubscription`), so the group's membership and the partitions'
//! ownership live here instead:
//!
//! - Every consumer renews its membership of (group, topic) every
//!   [`Ownership::interval`] and reads the live members. Sorted by name,
//!   member `i` of `n` aims at the partitions at positions `i, i + n, …`.
//! - It renews the leases it holds, gives back those it no longer aims at
//!   (after a synchronous commit of what it processed, so the next owner
//!   resumes right after it), and takes the ones it aims at that are free
//!   or expired. A partition is read only while its lease is held.
//! - A member that joins makes the others give partitions back at their
//!   next round; one that stops cleanly gives its leases back and leaves; one
//!   that dies (SIGKILL) stops renewing, and its partitions move once its
//!   membership and leases have expired (`ingest.lease_secs`).
//! - A member writes and commits only while its leases are valid on its own
//!   clock (4/5 of the lease after the round that renewed them began). A
//!   member that stalls longer drops the batch in hand (its records are
//!   delivered again to whoever owns the partition). Should a stalled
//!   writer still race the new owner, its object writes are conditional
//!   merges that lose nothing, and its late commit can only move the
//!   offset back (records delivered twice, deduplicated by the merge).
//! - A member is a node name: a node restarted under its name takes its own
//!   leases back at once instead of waiting for them to expire.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tickmesh_core::Result;
use tickmesh_io::bus::Subscription;
use tickmesh_io::db::Db;
use tracing::{info, warn};

/// How a consumer takes part in partition ownership.
#[derive(Clone)]
pub struct LeaseArgs {
    pub db: Db,
    /// This consumer's member name (the node's name).
    pub member: String,
    /// How long a membership or a lease lasts without renewal.
    pub ttl: Duration,
}

/// One consumer's membership and leases of one topic.
pub struct Ownership {
    args: LeaseArgs,
    group: String,
    topic: String,
    owned: Vec<i32>,
    /// Until when this member may write and commit for `owned`.
    valid_until: Instant,
    next_round: Instant,
}

/// Member `index` of `members`' share of `all` (sorted): every `members`-th
/// partition from position `index`.
pub fn target(all: &[i32], members: usize, index: usize) -> Vec<i32> {
    let mut all = all.to_vec();
    all.sort_unstable();
    all.into_iter()
        .enumerate()
        .filter(|(i, _)| members > 0 && i % members == index)
        .map(|(_, p)| p)
        .collect()
}

impl Ownership {
    /// `group` and `topic` name the lease scope (the Kafka group and the
    /// full topic name, prefix included).
    pub fn new(args: LeaseArgs, group: &str, topic: &str) -> Self {
        let now = Instant::now();
        Ownership {
            args,
            group: group.to_string(),
            topic: topic.to_string(),
            owned: Vec::new(),
            valid_until: now,
            next_round: now,
        }
    }

    /// The time between rounds: a fifth of the lease, at most 1 s.
    pub fn interval(&self) -> Duration {
        (self.args.ttl / 5).min(Duration::from_secs(1))
    }

    /// Whether a round is due.
    pub fn due(&self) -> bool {
        Instant::now() >= self.next_round
    }

    /// Whether this member may still write and commit for its partitions.
    pub fn valid(&self) -> bool {
        Instant::now() < self.valid_until
    }

    /// The partitions held.
    pub fn owned(&self) -> &[i32] {
        &self.owned
    }

    /// One round (see the module's docs); `sub` is reassigned to the
    /// partitions held afterwards. Returns whether partitions were given up
    /// or lost. A database error is returned only once the leases are no
    /// longer valid: until then the next round tries again.
    pub async fn round(&mut self, sub: &mut dyn Subscription) -> Result<bool> {
        let started = Instant::now();
        self.next_round = started + self.interval();
        match self.try_round(sub, started).await {
            Ok(dropped) => Ok(dropped),
            Err(e) if self.valid() => {
                warn!(topic = %self.topic, member = %self.args.member, error = %e, "partition lease round failed; trying again while the leases are valid");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    async fn try_round(&mut self, sub: &mut dyn Subscription, started: Instant) -> Result<bool> {
        let (db, member) = (&self.args.db, self.args.member.as_str());
        let ttl_ms = self.args.ttl.as_millis() as i64;
        let members = db
            .ingest_heartbeat(&self.group, &self.topic, member, ttl_ms)
            .await?;
        let all = sub.partitions().await?;
        let aim: BTreeSet<i32> = match members.iter().position(|m| m == member) {
            Some(i) => target(&all, members.len(), i).into_iter().collect(),
            None => BTreeSet::new(),
        };
        let held: BTreeSet<i32> = db
            .ingest_renew(&self.group, &self.topic, member, ttl_ms)
            .await?
            .into_iter()
            .collect();
        let lost: Vec<i32> = self
            .owned
            .iter()
            .filter(|p| !held.contains(p))
            .copied()
            .collect();
        if !lost.is_empty() {
            warn!(topic = %self.topic, member, partitions = ?lost, "partition leases ran out and were taken over");
        }
        let surplus: Vec<i32> = held.iter().filter(|p| !aim.contains(p)).copied().collect();
        let mut keep: BTreeSet<i32> = held.intersection(&aim).copied().collect();
        let mut taken = Vec::new();
        for p in aim.iter().filter(|p| !held.contains(p)) {
            if let Some(epoch) = db
                .ingest_acquire(&self.group, &self.topic, *p, member, ttl_ms)
                .await?
            {
                taken.push((*p, epoch));
                keep.insert(*p);
            }
        }
        let keep: Vec<i32> = keep.into_iter().collect();
        if keep != self.owned || !surplus.is_empty() {
            // Flushes the commits of the partitions given up before the
            // database says they are free.
            sub.assign(&keep).await?;
        }
        if !surplus.is_empty() {
            db.ingest_release(&self.group, &self.topic, member, &surplus, false)
                .await?;
        }
        if !taken.is_empty() || !surplus.is_empty() {
            info!(topic = %self.topic, member, members = members.len(), taken = ?taken, released = ?surplus, owned = ?keep, "partition ownership changed");
        }
        metrics::gauge!("tickmesh_ingest_partitions_owned", "topic" => self.topic.clone())
            .set(keep.len() as f64);
        let dropped = self.owned.iter().any(|p| !keep.contains(p));
        self.owned = keep;
        self.valid_until = started + self.args.ttl * 4 / 5;
        Ok(dropped)
    }

    /// Stops reading every partition, so that the next round starts those
    /// it keeps at their committed offsets (after a batch was dropped).
    pub async fn reset(&mut self, sub: &mut dyn Subscription) -> Result<()> {
        self.owned.clear();
        self.next_round = Instant::now();
        sub.assign(&[]).await
    }

    /// Gives every lease back and leaves the group (a clean stop), after a
    /// last synchronous commit.
    pub async fn leave(&mut self, sub: &mut dyn Subscription) -> Result<()> {
        let owned = std::mem::take(&mut self.owned);
        self.valid_until = Instant::now();
        metrics::gauge!("tickmesh_ingest_partitions_owned", "topic" => self.topic.clone()).set(0.0);
        let flushed = sub.assign(&[]).await;
        let released = self
            .args
            .db
            .ingest_release(&self.group, &self.topic, &self.args.member, &owned, true)
            .await;
        info!(topic = %self.topic, member = %self.args.member, released = ?owned, "left the partition group");
        flushed.and(released)
    }
}

#[cfg(test)]
mod tests {
    use super::target;

    #[test]
    fn members_split_the_partitions_evenly_and_completely() {
        let all: Vec<i32> = (0..7).collect();
        for n in 1..=9 {
            let mut seen: Vec<i32> = (0..n).flat_map(|i| target(&all, n, i)).collect();
            seen.sort_unstable();
            assert_eq!(seen, all, "{n} members");
            let sizes: Vec<usize> = (0..n).map(|i| target(&all, n, i).len()).collect();
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
        }
        assert_eq!(target(&[5, 1, 3], 2, 0), vec![1, 5]);
        assert!(target(&all, 0, 0).is_empty());
    }
}
