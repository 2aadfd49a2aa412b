//! Parity with PyTorch: each kind's safetensors load with
//! `load_state_dict(strict=True)` into the equivalent `torch.nn` module
//! (`scripts/py/tickmesh_torch.py`, run by the torch venv that
//! `scripts/setup.sh` installs), and its output on the same inputs equals
//! ours to 1e-5: the libtorch forward that trains, and the native forward
//! that serves (`tickmesh_model::native`), each checked by PyTorch.

use std::path::PathBuf;
use std::process::Command;

use rand::{Rng, SeedableRng};
use tch::{nn, Device, Kind, Tensor};
use tickmesh_core::config::ModelKind;
use tickmesh_model::arch::{build, init_seeded, Arch};
use tickmesh_model::checkpoint::weights_bytes;
use tickmesh_model::native::{NativeModel, Scratch};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The Python of the torch venv (scripts/env.sh puts it first on PATH).
fn python() -> String {
    let py = std::env::var("TICKMESH_PYTHON").unwrap_or_else(|_| "python".into());
    let ok = Command::new(&py)
        .args(["-c", "import torch, safetensors"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "`{py}` cannot import torch and safetensors: run scripts/setup.sh and `. scripts/env.sh` (scripts/test.sh does both)"
    );
    py
}

#[test]
fn every_kind_equals_its_pytorch_module() {
    let py = python();
    for (k, kind) in ModelKind::ALL.into_iter().enumerate() {
        for layers in [1, 2] {
            let a = Arch {
                kind,
                features: 5,
                hidden: 16,
                layers,
                conv_channels: 12,
                kernel_size: 3,
            };
            let vs = nn::VarStore::new(Device::Cpu);
            let model = build(&vs.root(), &a);
            init_seeded(&vs, &a, 11);
            // Larger weights than the init's (whose output layer starts near 0),
            // so the comparison is of outputs of order 1.
            let mut rng = rand::rngs::StdRng::seed_from_u64(k as u64 * 10 + layers as u64);
            tch::no_grad(|| {
                let mut vars: Vec<_> = vs.variables().into_iter().collect();
                vars.sort_by(|x, y| x.0.cmp(&y.0));
                for (_, mut t) in vars {
                    let v: Vec<f32> = (0..t.numel())
                        .map(|_| rng.random_range(-0.6f32..0.6))
                        .collect();
                    t.copy_(&Tensor::from_slice(&v).reshape(t.size()));
                }
            });
            let x = Tensor::randn([64, 30, 5], (Kind::Float, Device::Cpu));
            let y = tch::no_grad(|| model.forward(&x));
            assert_eq!(y.size(), vec![64]);
            // The native forward, window by window.
            let native = NativeModel::from_vars(&a, &vs.variables()).unwrap();
            let xs = Vec::<f32>::try_from(x.view([-1])).unwrap();
            let mut scratch = Scratch::default();
            let ys: Vec<f32> = xs
                .chunks(30 * 5)
                .map(|w| native.forward(w, &mut scratch))
                .collect();
            let torch_y = Vec::<f32>::try_from(&y).unwrap();
            let worst = ys
                .iter()
                .zip(&torch_y)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            println!("{kind} layers={layers}: native vs libtorch max_abs_diff={worst:e}");
            assert!(
                worst <= 1e-5,
                "{kind} layers={layers}: native vs libtorch {worst}"
            );
            let y_native = Tensor::from_slice(&ys);
            for (engine, y) in [("libtorch", &y), ("native", &y_native)] {
                let dir = tempfile::tempdir().unwrap();
                std::fs::write(
                    dir.path().join("model.safetensors"),
                    weights_bytes(&vs).unwrap(),
                )
                .unwrap();
                let meta = serde_json::json!({
                    "kind": kind.as_str(),
                    "features": ["close", "log_return", "sma_20", "rsi_14", "obv"],
                    "hidden": a.hidden,
                    "layers": a.layers,
                    "conv_channels": a.conv_channels,
                    "kernel_size": a.kernel_size,
                });
                std::fs::write(dir.path().join("meta.json"), meta.to_string()).unwrap();
                Tensor::write_safetensors(
                    &[("x", &x), ("y", y)],
                    dir.path().join("io.safetensors"),
                )
                .unwrap();
                let out = Command::new(&py)
                    .arg(repo().join("scripts/py/parity.py"))
                    .arg(dir.path())
                    .args(["--tol", "1e-5"])
                    .output()
                    .unwrap();
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                println!("{kind} layers={layers} {engine}: {}", text.trim());
                assert!(
                    out.status.success(),
                    "{kind} layers={layers} {engine}: {text}"
                );
                assert!(text.contains(&format!("parity {kind}")), "{text}");
            }
        }
    }
}
