//! Training is deterministic on the CPU for a fixed seed, also with several
//! trainers running at once in one process (each draws from its own
//! generators, never libtorch's process-global one).

use tickmesh_core::config::{ModelKind, TrainConfig, FEATURE_COLUMNS};
use tickmesh_core::db::AggRow;
use tickmesh_core::synthetic::SyntheticMarket;
use tickmesh_model::checkpoint::weights_bytes;
use tickmesh_model::dataset::Dataset;
use tickmesh_model::fit::fit;

fn rows(features: &[String]) -> Vec<AggRow> {
    let bars = SyntheticMarket.bars(
        "DET",
        "2024-03-04".parse().unwrap(),
        "2024-03-05".parse().unwrap(),
    );
    let cols: Vec<usize> = features
        .iter()
        .map(|f| FEATURE_COLUMNS.iter().position(|c| c == f).unwrap())
        .collect();
    tickmesh_features::feature_rows(&bars)
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
