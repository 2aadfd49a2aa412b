//! Training as a product: on a real daily series shipped as test data
//! (`data/sample/train/AAPL_1d_bokeh.csv`), through the same code
//! `tickmesh train` runs; checkpoints that reload bit for bit and refuse
//! corruption; forecast inputs that equal training inputs; the CLI's errors;
//! and the CUDA backend loaded whenever the linked libtorch has one.

use std::path::{Path, PathBuf};
use std::process::Command;

use tickmesh::train_cli::{self, Source, TrainOptions};
use tickmesh_core::config::{FeatureConfig, ModelKind, TrainConfig};
use tickmesh_core::types::AggRow;
use tickmesh_core::types::Interval;
use tickmesh_model::checkpoint;
use tickmesh_model::dataset::Dataset;
use tickmesh_model::forecast::Forecaster;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn sample_dir() -> PathBuf {
    repo().join("data/sample/train")
}

fn tickmesh(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tickmesh"))
        .args(args)
        .current_dir(repo())
        .env("RUST_LOG", "error")
        .output()
        .unwrap()
}

async fn train_aapl(kind: ModelKind, out: &Path) -> train_cli::Trained {
    let mut cfg = TrainConfig {
        epochs: 40,
        patience: 4,
        device: "cpu".into(),
        ..TrainConfig::default()
    };
    train_cli::apply_overrides(
        &mut cfg,
        &FeatureConfig::default(),
        Some(kind.as_str()),
        None,
        None,
    )
    .unwrap();
    train_cli::train(TrainOptions {
        ticker: "AAPL".into(),
        interval: Interval::D1,
        source: Source::Csv(sample_dir()),
        out: out.to_path_buf(),
        train: cfg,
        indicators: FeatureConfig::default(),
        progress: false,
    })
    .await
    .unwrap()
}

/// All stored columns of AAPL's daily rows, as the aggregator would load them.
fn aapl_rows() -> Vec<AggRow> {
    let files = train_cli::csv_files(&sample_dir(), "AAPL", Interval::D1).unwrap();
    tickmesh_features::feature_rows(
        &FeatureConfig::default(),
        &train_cli::read_csv_bars(&files).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trains_on_a_real_daily_series_and_reloads_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("AAPL_1d");
    let t = train_aapl(ModelKind::LstmAttention, &out).await;
    let f = &t.fitted;

    // The loss decreases and early stopping triggers.
    let first = f.history.first().unwrap();
    let best = f
        .history
        .iter()
        .map(|p| p.train_loss)
        .fold(f64::INFINITY, f64::min);
    assert!(
        best < first.train_loss,
        "train loss never fell below epoch 1's"
    );
    assert!(
        f.best_val_loss < f.initial_val_loss,
        "validation never beat the untrained model"
    );
    assert!(
        f.stopped_early,
        "patience 4 within 40 epochs: early stopping triggers"
    );
    assert!(f.epochs_run < 40 && f.best_epoch + 4 == f.epochs_run);

    // The test metrics and the naive baseline are written.
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("meta.json")).unwrap()).unwrap();
    for side in ["model", "naive"] {
        for k in ["mae", "mse", "rmse", "mape"] {
            assert!(
                meta["metrics"][side][k].as_f64().unwrap() > 0.0,
                "{side}.{k}"
            );
        }
    }
    assert!(meta["metrics"]["ratio_to_naive"]["rmse"].as_f64().unwrap() > 0.0);
    let da = meta["metrics"]["model"]["directional_accuracy"]
        .as_f64()
        .unwrap();
    assert!((0.0..=1.0).contains(&da));
    assert_eq!(meta["metrics"]["model"]["samples"], meta["splits"]["test"]);
    assert!(meta["splits"]["test_from"].as_str().unwrap() > meta["data"]["from"].as_str().unwrap());
    for png in ["loss.png", "test.png"] {
        let b = std::fs::read(out.join(png)).unwrap();
        assert!(b.starts_with(b"\x89PNG") && b.len() > 5_000, "{png}");
    }

    // `tickmesh evaluate` over the test split's dates re-scores exactly the test windows.
    let (from, to) = (
        t.meta.splits.test_from.date_naive().to_string(),
        t.meta.splits.test_to.date_naive().to_string(),
    );
    let o = tickmesh(&[
        "evaluate",
        "--checkpoint",
        out.to_str().unwrap(),
        "--data-dir",
        "data/sample/train",
        "--from",
        &from,
        "--to",
        &to,
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let again: tickmesh_model::metrics::EvalReport = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(again, t.meta.metrics);

    // A reloaded checkpoint forecasts bit for bit like the trained model.
    let rows = aapl_rows();
    let weights = checkpoint::weights_bytes(&f.vs).unwrap();
    let live = Forecaster::load(t.meta.clone(), &weights).unwrap();
    let (meta2, weights2) = checkpoint::read_dir(&out).unwrap();
    assert_eq!(meta2, t.meta);
    let reloaded = Forecaster::load(meta2, &weights2).unwrap();
    let h = live.history_of(&rows).unwrap();
    let a = live.forecast(&h, 50).unwrap();
    let b = reloaded.forecast(&h, 50).unwrap();
    assert_eq!(a.len(), 50);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((x.ts, x.close.to_bits()), (y.ts, y.close.to_bits()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_weights_or_meta_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ck");
    train_aapl(ModelKind::Gru, &out).await;
    checkpoint::read_dir(&out).unwrap();

    let copy = |name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["model.safetensors", "meta.json", "CHECKSUM", "test.json"] {
            std::fs::copy(out.join(f), d.join(f)).unwrap();
        }
        d
    };
    // One flipped bit in the weights.
    let d = copy("bad-weights");
    let mut w = std::fs::read(d.join("model.safetensors")).unwrap();
    let n = w.len();
    w[n - 3] ^= 0x01;
    std::fs::write(d.join("model.safetensors"), w).unwrap();
    let e = checkpoint::read_dir(&d).unwrap_err().to_string();
    assert!(
        e.contains("model.safetensors does not match meta.json"),
        "{e}"
    );

    // A tampered scaler that still parses.
    let d = copy("bad-meta");
    let text = std::fs::read_to_string(d.join("meta.json")).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&text).unwrap();
    let v = m["scaler"]["max"][1].as_f64().unwrap();
    m["scaler"]["max"][1] = serde_json::json!(v * 1.5);
    std::fs::write(d.join("meta.json"), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let e = checkpoint::read_dir(&d).unwrap_err().to_string();
    assert!(
        e.contains("meta.json does not match the registered checkpoint digest"),
        "{e}"
    );

    // meta.json that is not JSON.
    let d = copy("garbled-meta");
    std::fs::write(d.join("meta.json"), b"{\"kind\": \"lstm_att").unwrap();
    let e = checkpoint::read_dir(&d).unwrap_err().to_string();
    assert!(
        e.contains("meta.json is not a valid checkpoint description"),
        "{e}"
    );

    // The CLI refuses it with exit code 2 and one line.
    let o = tickmesh(&[
        "evaluate",
        "--checkpoint",
        d.to_str().unwrap(),
        "--data-dir",
        "data/sample/train",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("meta.json") && err.trim().lines().count() == 1,
        "{err}"
    );
}

/// The first forecast step's input window is bit-identical to the window
/// training builds for the same timestamp, with every feature selected; the
/// next step's row equals a full recomputation over the whole history plus
/// the predicted bar (not over a truncated tail).
#[test]
fn forecast_inputs_equal_training_inputs() {
    let rows = aapl_rows();
    let features = FeatureConfig::default().columns();
    let cfg = TrainConfig {
        features: features.clone(),
        epochs: 1,
        hidden: 8,
        device: "cpu".into(),
        ..TrainConfig::default()
    };
    let ds = Dataset::build(
        &rows,
        &features,
        cfg.seq_len,
        cfg.val_fraction,
        cfg.test_fraction,
    )
    .unwrap();
    let fitted = tickmesh_model::fit::fit(ds.clone(), &cfg, tch::Device::Cpu, |_| {}).unwrap();
    let weights = checkpoint::weights_bytes(&fitted.vs).unwrap();
    let meta = checkpoint::Meta::of(
        &fitted,
        &cfg,
        &FeatureConfig::default(),
        "AAPL",
        Interval::D1,
        1,
        &weights,
    );
    let fc = Forecaster::load(meta, &weights).unwrap();
    // Rows before the first complete one (indicator warm-up) are dropped by the dataset.
    let skipped = rows.len() - ds.rows.len();
    for i in [0, 500, ds.splits.test.start, ds.n_samples() - 1] {
        // Stored rows up to the window's last bar, as the database would hold them.
        let end = skipped + i + ds.seq_len;
        let h = fc.history_of(&rows[..end]).unwrap();
        assert_eq!(h.last().unwrap().0, ds.ts[i + ds.seq_len - 1]);
        let served = fc.window(&h).unwrap();
        let trained = ds.window(i);
        assert_eq!(served.len(), trained.len());
        assert!(
            served
                .iter()
                .zip(&trained)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "window {i} differs"
        );
        // One step further: the state at the last stored bar, advanced by the
        // predicted bar, equals the features recomputed over the whole history.
        let p = fc.forecast(&h, 1).unwrap()[0];
        let mut h2 = h.clone();
        let last = h.last().unwrap().1;
        let bar = tickmesh_features::Ohlcv {
            o: last.c,
            h: last.c.max(p.close),
            l: last.c.min(p.close),
            c: p.close,
            v: last.v,
        };
        h2.push_bar(p.ts, bar);
        let mut st = tickmesh_features::IndicatorState::new(&FeatureConfig::default());
        let mut full = None;
        for r in &rows[..end] {
            st.step(tickmesh_features::Ohlcv::of_row(&r.values).unwrap());
        }
        full.replace(st.step(bar));
        assert_eq!(
            h2.last_row().unwrap().to_vec(),
            full.unwrap().to_vec(),
            "step after window {i}"
        );
    }
}

#[test]
fn cli_errors_are_one_line_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let few = dir.path().join("FEW_1d_x.csv");
    let mut csv = String::from("Date,Open,High,Low,Close,Volume\n");
    for d in 1..=25 {
        csv.push_str(&format!("2024-01-{d:02},10,11,9,10.5,1000\n"));
    }
    std::fs::write(&few, csv).unwrap();
    let data = dir.path().to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["train", "--ticker", "NOPE", "--data-dir", data],
            "no file",
        ),
        (
            &["train", "--ticker", "FEW", "--data-dir", data],
            "too few rows",
        ),
        (
            &[
                "train",
                "--ticker",
                "AAPL",
                "--data-dir",
                "data/sample/train",
                "--features",
                "close,moon_phase",
            ],
            "moon_phase",
        ),
        (
            &[
                "train",
                "--ticker",
                "AAPL",
                "--data-dir",
                "data/sample/train",
                "--model",
                "transformer",
            ],
            "transformer",
        ),
        (&["evaluate", "--checkpoint", "/nonexistent/ck"], "CHECKSUM"),
    ];
    for (args, want) in cases {
        let o = tickmesh(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(lines[0].contains(want), "{args:?}: {err}");
    }
}

#[test]
fn the_binary_loads_libtorch_cuda_when_libtorch_has_it() {
    let o = tickmesh(&["doctor", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let d: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let dir = PathBuf::from(
        d["libtorch_dir"]
            .as_str()
            .expect("libtorch found in the process"),
    );
    assert!(
        d["libtorch_version"]
            .as_str()
            .unwrap()
            .starts_with("2.11.0"),
        "{d}"
    );
    let present = dir.join("libtorch_cuda.so").exists();
    assert_eq!(d["cuda_library_present"], present);
    if present {
        assert_eq!(
            d["cuda_library_loaded"], true,
            "{}/libtorch_cuda.so exists but tickmesh did not load it (node/build.rs links it with --no-as-needed)",
            dir.display()
        );
    }
}

/// `--from-db` trains from `aggregated_data` (here the embedded SQLite of a
/// config file); a ticker without rows is one line and exit code 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trains_from_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("cluster.toml");
    std::fs::write(
        &toml,
        format!(
            "[cluster]\nbackend = \"embedded\"\n[embedded]\ndata_dir = \"{}\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let cfg = tickmesh_core::config::ClusterConfig::load(&toml, &std::collections::HashMap::new())
        .unwrap();
    let a = tickmesh_io::Adapters::connect(&cfg).await.unwrap();
    a.db.load_aggregated(
        "AAPL",
        Interval::D1,
        &FeatureConfig::default().columns(),
        &aapl_rows(),
    )
    .await
    .unwrap();
    drop(a);
    let out = dir.path().join("ck");
    let o = tickmesh(&[
        "train",
        "--from-db",
        "--config",
        toml.to_str().unwrap(),
        "--ticker",
        "AAPL",
        "--epochs",
        "2",
        "--model",
        "cnn_lstm",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(m["model"]["rmse"].as_f64().unwrap() > 0.0, "{m}");
    let (meta, _) = checkpoint::read_dir(&out).unwrap();
    assert_eq!(meta.kind, ModelKind::CnnLstm);
    assert_eq!(
        meta.data.rows,
        aapl_rows().len() - 19,
        "rows from the database, warm-up dropped"
    );

    let o = tickmesh(&[
        "train",
        "--from-db",
        "--config",
        toml.to_str().unwrap(),
        "--ticker",
        "NOPE",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown ticker NOPE"));
}
