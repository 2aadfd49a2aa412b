//! The trainer pool fuses the jobs it is assigned together: four tickers'
//! jobs of one kind and shape train as one computation on the node's
//! device, and each ends as its own checkpoint (its own version, metrics,
//! scaler), with the weights its job would have reached alone.

mod common;

use std::time::Duration;

use common::*;
use tickmesh_aggregate::aggregator;
use tickmesh_core::config::{ModelKind, Role};
use tickmesh_core::types::Interval;
use tickmesh_model::checkpoint;
use tickmesh_model::dataset::Dataset;

const I: Interval = Interval::M15;
const TICKERS: [&str; 4] = ["FPA", "FPB", "FPC", "FPD"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_trains_its_jobs_fused_into_checkpoints_equal_to_lone_fits() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cfg, a) = embedded(dir.path()).await;
    cfg.train.model = ModelKind::Gru;
    cfg.train.cpu_fuse_group = 4;
    // Long enough for the four aggregations' jobs to arrive together.
    cfg.train.fuse_wait_ms = 5_000;
    for (k, t) in TICKERS.iter().enumerate() {
        // Different lengths: the fused members have different numbers of windows.
        let to = ["2024-04-12", "2024-04-15", "2024-04-16", "2024-04-17"][k];
        store_synthetic(&a, t, "2024-04-01", to).await;
    }
    let node = start(&cfg, &a, &[Role::Coordinator, Role::Train]).await;
    let tickers: Vec<String> = TICKERS.iter().map(|t| t.to_string()).collect();
    aggregator::run(&aggregator_args(&a), &tickers, I)
        .await
        .unwrap();
    let db = a.db.clone();
    eventually("four versions registered", Duration::from_secs(180), || {
        let db = db.clone();
        async move {
            let mut n = 0;
            for t in TICKERS {
                n += db.models(Some(t), Some(I), true).await.unwrap().len();
            }
            n >= 4
        }
    })
    .await;
    let mut windows = Vec::new();
    let mut trained = 0;
    for t in TICKERS {
        let v = a.db.models(Some(t), Some(I), true).await.unwrap()[0].clone();
        assert_eq!(v.status, "champion", "{t}: {v:?}");
        let (meta, weights) = checkpoint::read(a.store.as_ref(), t, I, v.version, &v.sha256)
            .await
            .unwrap();
        assert_eq!(meta.ticker, t);
        assert_eq!(
            meta.fused_group,
            Some(4),
            "{t} was trained in one fused group of four"
        );
        windows.push(meta.splits.train);
        // The same job alone: the same rows, config and seed.
        let rows =
            a.db.read_aggregated(t, I, &cfg.train.features, None)
                .await
                .unwrap();
        let train = cfg.train.clone();
        let (meta2, weights2) = (meta.clone(), weights.clone());
        let (alone, m) = tokio::task::spawn_blocking(move || {
            let ds = Dataset::build(
                &rows,
                &train.features,
                train.seq_len,
                train.val_fraction,
                train.test_fraction,
            )
            .unwrap();
            let alone = tickmesh_model::fit::fit(ds, &train, tch::Device::Cpu, |_| {}).unwrap();
            let (vs, _) = checkpoint::load_model(&meta2, &weights2, tch::Device::Cpu).unwrap();
            (alone, vs)
        })
        .await
        .unwrap();
        let ours = m.variables();
        let mut worst = 0f64;
        for (name, t) in alone.vs.variables() {
            worst = worst.max((t - &ours[&name]).abs().max().double_value(&[]));
        }
        println!(
            "{t}: v{} fused in 4, {} training windows, rmse {:.4} (naive {:.4}), max |fused - alone| = {worst:e}",
            v.version, meta.splits.train, meta.metrics.model.rmse, meta.metrics.naive.rmse
        );
        assert!(worst <= 1e-5, "{t}: {worst}");
        assert_eq!(meta.epochs_run, alone.epochs_run, "{t}");
        assert_eq!(meta.best_epoch, alone.best_epoch, "{t}");
        trained += usize::from(meta.best_epoch > 0);
        assert!(
            (meta.metrics.model.rmse - alone.eval.model.rmse).abs()
                <= 1e-6 * alone.eval.model.rmse.max(1e-9)
        );
    }
    assert!(
        trained >= 2,
        "at least two members kept trained weights (not the initial ones)"
    );
    windows.dedup();
    assert_eq!(windows.len(), 4, "the members differ in size: {windows:?}");
    drop(node);
}
