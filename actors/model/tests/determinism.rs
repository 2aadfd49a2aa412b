//! Training is deterministic on the CPU for a fixed seed, also with several
//! trainers running at once in one process (each draws from its own
//! generators, never libtorch's process-global one).

use tickmesh_core::config::{FeatureConfig, ModelKind, TrainConfig};
use tickmesh_core::synthetic::SyntheticMarket;
use tickmesh_core::types::AggRow;
use tickmesh_model::checkpoint::weights_bytes;
use tickmesh_model::dataset::Dataset;
use tickmesh_model::fit::fit;

fn rows(features: &[String]) -> Vec<AggRow> {
    let bars = SyntheticMarket.bars(
        "DET",
        "2024-03-04".parse().unwrap(),
        "2024-03-05".parse().unwrap(),
    );
    let indicators = FeatureConfig::default();
    let all = indicators.columns();
    let cols: Vec<usize> = features
        .iter()
        .map(|f| all.iter().position(|c| c == f).unwrap())
        .collect();
    tickmesh_features::feature_rows(&indicators, &bars)
        .into_iter()
        .map(|r| AggRow {
            ts: r.ts,
            values: cols.iter().map(|&c| r.values[c]).collect(),
        })
        .collect()
}

fn train(kind: ModelKind, seed: i64) -> (Vec<u8>, Vec<f64>) {
    let cfg = TrainConfig {
        model: kind,
        hidden: 8,
        seq_len: 10,
        epochs: 3,
        patience: 10,
        device: "cpu".into(),
        seed,
        ..TrainConfig::default()
    };
    let r = rows(&cfg.features);
    let ds = Dataset::build(
        &r,
        &cfg.features,
        cfg.seq_len,
        cfg.val_fraction,
        cfg.test_fraction,
    )
    .unwrap();
    let f = fit(ds, &cfg, tch::Device::Cpu, |_| {}).unwrap();
    let losses = f.history.iter().map(|p| p.val_loss).collect();
    (weights_bytes(&f.vs).unwrap(), losses)
}

#[test]
fn same_seed_same_weights_even_with_trainers_running_at_once() {
    for kind in ModelKind::ALL {
        let alone = train(kind, 7);
        let together: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = [7, 8, 7]
                .into_iter()
                .map(|seed| s.spawn(move || train(kind, seed)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(
            together[0], alone,
            "{kind}: a concurrent run equals a lone run"
        );
        assert_eq!(
            together[2], alone,
            "{kind}: two concurrent runs with one seed agree"
        );
        assert_ne!(
            together[1].0, alone.0,
            "{kind}: another seed trains another model"
        );
    }
}

/// Takes a snapshot after every `every` epochs; can stop the fit after one.
struct Snapshots {
    every: usize,
    stop_after: Option<usize>,
    taken: Vec<(Vec<u8>, Vec<u8>)>,
}

impl tickmesh_model::fit::FitHooks for Snapshots {
    fn epoch(&mut self, _: tickmesh_model::fit::EpochProgress) -> tickmesh_core::Result<()> {
        Ok(())
    }
    fn snapshot_every(&self) -> usize {
        self.every
    }
    fn snapshot(&mut self, s: tickmesh_model::fit::Snapshot) -> tickmesh_core::Result<()> {
        self.taken.push(s.encode()?);
        if self.stop_after == Some(s.state.epoch) {
            return Err(tickmesh_core::Error::Conflict("stopped here".into()));
        }
        Ok(())
    }
}

#[test]
fn a_fit_resumed_from_a_snapshot_ends_with_the_weights_of_one_that_never_stopped() {
    use tickmesh_model::fit::{fit_with, Snapshot};
    for kind in ModelKind::ALL {
        let cfg = TrainConfig {
            model: kind,
            hidden: 8,
            seq_len: 10,
            epochs: 6,
            patience: 10,
            device: "cpu".into(),
            ..TrainConfig::default()
        };
        let r = rows(&cfg.features);
        let ds = || {
            Dataset::build(
                &r,
                &cfg.features,
                cfg.seq_len,
                cfg.val_fraction,
                cfg.test_fraction,
            )
            .unwrap()
        };
        let whole = fit(ds(), &cfg, tch::Device::Cpu, |_| {}).unwrap();

        // Stopped after epoch 3 (as a trainer whose lease ran out) ...
        let mut first = Snapshots {
            every: 3,
            stop_after: Some(3),
            taken: Vec::new(),
        };
        let Err(err) = fit_with(ds(), &cfg, tch::Device::Cpu, None, &mut first) else {
            panic!("the hook stops the fit")
        };
        assert!(err.to_string().contains("stopped here"), "{err}");
        let (tensors, state) = first.taken.pop().expect("a snapshot after epoch 3");

        // ... and resumed elsewhere from its snapshot.
        let snap = Snapshot::decode(&tensors, &state).unwrap();
        assert_eq!(snap.state.epoch, 3);
        let mut rest = Snapshots {
            every: 0,
            stop_after: None,
            taken: Vec::new(),
        };
        let resumed = fit_with(ds(), &cfg, tch::Device::Cpu, Some(snap), &mut rest).unwrap();
        assert_eq!(
            weights_bytes(&resumed.vs).unwrap(),
            weights_bytes(&whole.vs).unwrap(),
            "{kind}: resumed weights equal the uninterrupted run's"
        );
        assert_eq!(resumed.history, whole.history, "{kind}: same loss history");
        assert_eq!(resumed.best_epoch, whole.best_epoch);

        // A snapshot never resumes a fit on other hyperparameters.
        let other = TrainConfig {
            learning_rate: 0.01,
            ..cfg.clone()
        };
        let snap = Snapshot::decode(&tensors, &state).unwrap();
        let Err(err) = fit_with(ds(), &other, tch::Device::Cpu, Some(snap), &mut rest) else {
            panic!("a snapshot of another fit is refused")
        };
        assert!(
            err.to_string().contains("other data or hyperparameters"),
            "{err}"
        );
    }
}
