//! Makes the `tickmesh` binary (and this package's tests) load
//! `libtorch_cuda.so` when the libtorch it is built against has one.
//!
//! torch-sys asks to link `torch_cuda`, but nothing in tch references a
//! symbol of it, so the linker's `--as-needed` drops it: the binary then
//! never loads the CUDA backend and `Device::cuda_if_available()` says no
//! even on a GPU machine. A link argument of a dependency's build script
//! does not reach the final binary, so it is given here. The libtorch is
//! found the way torch-sys finds it: with `LIBTORCH_USE_PYTORCH`, the torch
//! package of the Python on PATH; else `LIBTORCH_LIB`, else `LIBTORCH`.

use std::path::PathBuf;
use std::process::Command;

fn libtorch_lib() -> Option<PathBuf> {
    // torch-sys's order: the Python torch package first when asked for.
    if std::env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
        let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python".into());
        let out = Command::new(python)
            .args([
                "-c",
                "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
            ])
            .output()
            .ok()?;
        return out
            .status
            .success()
            .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    if let Ok(lib) = std::env::var("LIBTORCH_LIB") {
        return Some(PathBuf::from(lib).join("lib"));
    }
    if let Ok(root) = std::env::var("LIBTORCH") {
        return Some(PathBuf::from(root).join("lib"));
    }
    None
}

fn main() {
    for v in [
        "LIBTORCH",
        "LIBTORCH_LIB",
        "LIBTORCH_USE_PYTORCH",
        "PYTHON_SYS_EXECUTABLE",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    println!("cargo:rerun-if-changed=build.rs");
    if let Some(lib) = libtorch_lib().filter(|l| l.join("libtorch_cuda.so").exists()) {
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
