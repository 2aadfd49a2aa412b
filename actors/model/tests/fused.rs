//! Fused training equals one-at-a-time training: G models trained as one
//! computation end with the weights each would have reached alone (same
//! seeded initialisation, same minibatches), to 1e-5, for every kind; a
//! group that stops early does not change the others; a warm start and a
//! failing member's hooks stay with their own member.

use std::collections::HashMap;

use tch::Tensor;
use tickmesh_core::config::{FeatureConfig, ModelKind, TrainConfig};
use tickmesh_core::synthetic::SyntheticMarket;
use tickmesh_core::types::AggRow;
use tickmesh_core::{Error, Result};
use tickmesh_model::dataset::Dataset;
use tickmesh_model::fit::{fit, fit_with, EpochProgress, FitHooks, Fitted};
use tickmesh_model::fused::{fit_fused, Member};

fn dataset(cfg: &TrainConfig, ticker: &str, to: &str) -> Dataset {
    let bars = SyntheticMarket.bars(ticker, "2024-03-04".parse().unwrap(), to.parse().unwrap());
    let indicators = FeatureConfig::default();
    let all = indicators.columns();
    let cols: Vec<usize> = cfg
        .features
        .iter()
        .map(|f| all.iter().position(|c| c == f).unwrap())
        .collect();
    let rows: Vec<AggRow> = tickmesh_features::feature_rows(&indicators, &bars)
        .into_iter()
        .map(|r| AggRow {
            ts: r.ts,
            values: cols.iter().map(|&c| r.values[c]).collect(),
        })
        .collect();
    Dataset::build(
        &rows,
        &cfg.features,
        cfg.seq_len,
        cfg.val_fraction,
        cfg.test_fraction,
    )
    .unwrap()
}

fn config(kind: ModelKind) -> TrainConfig {
    TrainConfig {
        model: kind,
        hidden: 8,
        seq_len: 10,
        conv_channels: 6,
        epochs: 2,
        patience: 10,
        batch_size: 32,
        device: "cpu".into(),
        ..TrainConfig::default()
    }
}

#[derive(Default)]
struct Record {
    epochs: Vec<EpochProgress>,
    warm: Option<Vec<(String, Tensor)>>,
    /// Fail at this epoch (a lost lease).
    fail_at: Option<usize>,
    /// Take snapshots every this many epochs, and keep them.
    every: usize,
    snapshots: Vec<tickmesh_model::fit::Snapshot>,
}

impl FitHooks for Record {
    fn epoch(&mut self, p: EpochProgress) -> Result<()> {
        self.epochs.push(p);
        if self.fail_at == Some(p.epoch) {
            return Err(Error::Conflict("the lease was revoked".into()));
        }
        Ok(())
    }

    fn initial_weights(&mut self) -> Option<Vec<(String, Tensor)>> {
        self.warm.take()
    }

    fn snapshot_every(&self) -> usize {
        self.every
    }

    fn snapshot(&mut self, s: tickmesh_model::fit::Snapshot) -> Result<()> {
        // Through the bytes a store would hold.
        let (tensors, state) = s.encode()?;
        self.snapshots
            .push(tickmesh_model::fit::Snapshot::decode(&tensors, &state)?);
        Ok(())
    }
}

fn weights(f: &Fitted) -> HashMap<String, Tensor> {
    f.vs.variables()
}

/// The largest difference of any weight of `a` and `b` (each parameter's
/// printed).
fn diff(a: &Fitted, b: &Fitted) -> f64 {
    let (wa, wb) = (weights(a), weights(b));
    assert_eq!(wa.len(), wb.len());
    let mut worst = 0f64;
    for (n, t) in &wa {
        let d = (t - &wb[n]).abs().max().double_value(&[]);
        eprintln!("  {n}: {d:e}");
        worst = worst.max(d);
    }
    worst
}

/// How far the weights moved from the seeded start (so "equal" is not
/// "both untouched").
fn moved(f: &Fitted, cfg: &TrainConfig) -> f64 {
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let a = tickmesh_model::arch::Arch::of(cfg, f.dataset.n_features());
    let _m = tickmesh_model::arch::build(&vs.root(), &a);
    tickmesh_model::arch::init_seeded(&vs, &a, cfg.seed);
    let start = vs.variables();
    weights(f)
        .iter()
        .map(|(n, t)| (t - &start[n]).abs().max().double_value(&[]))
        .fold(0.0, f64::max)
}

fn fused(sets: &[Dataset], hooks: &mut [Record], cfg: &TrainConfig) -> Vec<Result<Fitted>> {
    let members = sets
        .iter()
        .zip(hooks.iter_mut())
        .map(|(ds, h)| Member {
            ds: ds.clone(),
            hooks: h,
        })
        .collect();
    fit_fused(members, cfg, tch::Device::Cpu).unwrap()
}

#[test]
fn fused_equals_one_at_a_time_for_every_kind() {
    for kind in ModelKind::ALL {
        let cfg = config(kind);
        // Three tickers with different numbers of windows: the short ones
        // run out of minibatches first in every epoch.
        let sets = vec![
            dataset(&cfg, "FUA", "2024-03-05"),
            dataset(&cfg, "FUB", "2024-03-06"),
            dataset(&cfg, "FUC", "2024-03-04"),
        ];
        let n: Vec<usize> = sets.iter().map(|d| d.splits.train.len()).collect();
        assert!(n[0] != n[1] && n[1] != n[2], "{n:?}");
        let mut hooks: Vec<Record> = sets.iter().map(|_| Record::default()).collect();
        let together = fused(&sets, &mut hooks, &cfg);
        for (k, ds) in sets.iter().enumerate() {
            let f = together[k].as_ref().unwrap();
            let alone = fit(ds.clone(), &cfg, tch::Device::Cpu, |_| {}).unwrap();
            let d = diff(f, &alone);
            let m = moved(&alone, &cfg);
            eprintln!(
                "{kind} member {k} ({} windows): max |fused - alone| = {d:e}, moved {m:e}",
                n[k]
            );
            assert!(m > 1e-3, "{kind}: training moved the weights ({m})");
            assert!(d <= 1e-5, "{kind} member {k}: max |fused - alone| = {d}");
            assert_eq!(f.epochs_run, alone.epochs_run, "{kind}");
            assert_eq!(f.best_epoch, alone.best_epoch, "{kind}");
            assert_eq!(f.fused_group, Some(3));
            assert_eq!(alone.fused_group, None);
            for (a, b) in f.history.iter().zip(&alone.history) {
                assert!(
                    (a.train_loss - b.train_loss).abs() <= 1e-5 * b.train_loss.abs().max(1e-3),
                    "{kind}: {a:?} vs {b:?}"
                );
                assert!(
                    (a.val_loss - b.val_loss).abs() <= 1e-5 * b.val_loss.abs().max(1e-3),
                    "{kind}: {a:?} vs {b:?}"
                );
            }
            assert_eq!(
                hooks[k].epochs.len(),
                alone.epochs_run,
                "the hooks saw every epoch"
            );
            // The test metrics come from the same weights.
            assert!(
                (f.eval.model.rmse - alone.eval.model.rmse).abs() <= 1e-6 * alone.eval.model.rmse
            );
        }
    }
}

#[test]
fn a_group_that_stops_early_leaves_the_others_unchanged() {
    let cfg = TrainConfig {
        epochs: 6,
        patience: 1,
        ..config(ModelKind::Gru)
    };
    let mut sets = vec![
        dataset(&cfg, "FUA", "2024-03-05"),
        dataset(&cfg, "FUB", "2024-03-06"),
        dataset(&cfg, "FUD", "2024-03-05"),
    ];
    // Member 1 learns shuffled targets: the members' validation losses
    // stop improving at different epochs.
    sets[1].shuffle_training_targets(3);
    let alone: Vec<Fitted> = sets
        .iter()
        .map(|ds| fit(ds.clone(), &cfg, tch::Device::Cpu, |_| {}).unwrap())
        .collect();
    let runs: Vec<usize> = alone.iter().map(|f| f.epochs_run).collect();
    eprintln!("epochs run alone: {runs:?}");
    assert!(
        runs.iter().min() < runs.iter().max() && runs.iter().min() < Some(&cfg.epochs),
        "some members stop early while another goes on: {runs:?}"
    );
    let mut hooks: Vec<Record> = sets.iter().map(|_| Record::default()).collect();
    let together = fused(&sets, &mut hooks, &cfg);
    for (k, a) in alone.iter().enumerate() {
        let f = together[k].as_ref().unwrap();
        assert_eq!(f.epochs_run, a.epochs_run, "member {k}");
        assert_eq!(f.stopped_early, a.stopped_early, "member {k}");
        assert_eq!(f.best_epoch, a.best_epoch, "member {k}");
        let d = diff(f, a);
        eprintln!(
            "member {k}: {} epochs, best {}, max |fused - alone| = {d:e}",
            f.epochs_run, f.best_epoch
        );
        assert!(d <= 1e-5, "member {k}: {d}");
    }
}

#[test]
fn warm_starts_and_failures_stay_with_their_member() {
    let cfg = config(ModelKind::Gru);
    let sets = vec![
        dataset(&cfg, "FUA", "2024-03-05"),
        dataset(&cfg, "FUB", "2024-03-05"),
        dataset(&cfg, "FUC", "2024-03-05"),
    ];
    // Member 0 warm-starts from a model trained on FUC; member 2 loses its lease at epoch 2.
    let donor = fit(sets[2].clone(), &cfg, tch::Device::Cpu, |_| {}).unwrap();
    let warm: Vec<(String, Tensor)> = donor
        .vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.copy()))
        .collect();
    let mut hooks = vec![
        Record {
            warm: Some(warm.iter().map(|(n, t)| (n.clone(), t.copy())).collect()),
            ..Record::default()
        },
        Record::default(),
        Record {
            fail_at: Some(2),
            ..Record::default()
        },
    ];
    let together = fused(&sets, &mut hooks, &cfg);
    let mut warm_hooks = Record {
        warm: Some(warm),
        ..Record::default()
    };
    let alone0 = fit_with(
        sets[0].clone(),
        &cfg,
        tch::Device::Cpu,
        None,
        &mut warm_hooks,
    )
    .unwrap();
    let alone1 = fit(sets[1].clone(), &cfg, tch::Device::Cpu, |_| {}).unwrap();
    let d0 = diff(together[0].as_ref().unwrap(), &alone0);
    let d1 = diff(together[1].as_ref().unwrap(), &alone1);
    eprintln!("warm-started member: {d0:e}; plain member: {d1:e}");
    assert!(d0 <= 1e-5 && d1 <= 1e-5, "{d0} {d1}");
    match &together[2] {
        Err(Error::Conflict(m)) => assert!(m.contains("revoked"), "{m}"),
        other => panic!(
            "member 2 fails with its hook's error, not {:?}",
            other.as_ref().map(|f| f.epochs_run)
        ),
    }
    assert_eq!(
        hooks[2].epochs.len(),
        2,
        "member 2 stopped at its failing epoch"
    );
    assert_eq!(hooks[1].epochs.len(), cfg.epochs);
}

#[test]
fn members_of_another_shape_are_refused() {
    let cfg = config(ModelKind::Gru);
    let a = dataset(&cfg, "FUA", "2024-03-05");
    let other = TrainConfig {
        seq_len: 12,
        ..cfg.clone()
    };
    let b = dataset(&other, "FUB", "2024-03-05");
    let mut h = [Record::default(), Record::default()];
    let [h0, h1] = &mut h;
    let members = vec![Member { ds: a, hooks: h0 }, Member { ds: b, hooks: h1 }];
    let err = fit_fused(members, &cfg, tch::Device::Cpu)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("differ in shape"), "{err}");
}

#[test]
fn a_fused_members_snapshot_resumes_alone_to_the_same_weights() {
    let cfg = TrainConfig {
        epochs: 5,
        learning_rate: 3e-3,
        ..config(ModelKind::CnnLstm)
    };
    let sets = vec![
        dataset(&cfg, "FUA", "2024-03-15"),
        dataset(&cfg, "FUB", "2024-03-12"),
    ];
    let mut hooks: Vec<Record> = sets
        .iter()
        .map(|_| Record {
            every: 2,
            ..Record::default()
        })
        .collect();
    let together = fused(&sets, &mut hooks, &cfg);
    let mut improved_after = 0;
    for (k, ds) in sets.iter().enumerate() {
        let snap = hooks[k].snapshots.remove(0);
        assert_eq!(snap.state.epoch, 2, "member {k}'s first snapshot");
        // A job handed to another node: it resumes the fused member's
        // snapshot alone.
        let resumed = fit_with(
            ds.clone(),
            &cfg,
            tch::Device::Cpu,
            Some(snap),
            &mut Record::default(),
        )
        .unwrap();
        let fused_k = together[k].as_ref().unwrap();
        let d = diff(&resumed, fused_k);
        eprintln!(
            "member {k}: resumed alone from the fused snapshot at epoch 2, best epoch {}, max |resumed - fused| = {d:e}",
            resumed.best_epoch
        );
        assert!(d <= 1e-5, "member {k}: {d}");
        assert_eq!(resumed.epochs_run, fused_k.epochs_run);
        assert_eq!(resumed.resumed_from_epoch, Some(2));
        improved_after += usize::from(resumed.best_epoch > 2);
    }
    assert!(
        improved_after > 0,
        "a member kept weights from after the snapshot (else the check is empty)"
    );
}
