//! `tickmesh-core` is the pure domain: nothing it links may do I/O. The
//! test walks the dependency graph in the workspace's `Cargo.lock` (which
//! records every package's resolved dependencies) from the pure crates and
//! fails naming the path to any adapter or runtime crate.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;

/// Crates that mean I/O or a runtime: brokers, object stores, databases,
/// file formats, async runtimes, actor frameworks, HTTP, torch.
const FORBIDDEN: &[&str] = &[
    "rdkafka",
    "rdkafka-sys",
    "aws-sdk-s3",
    "aws-config",
    "sqlx",
    "parquet",
    "arrow-array",
    "tokio",
    "mio",
    "ractor",
    "notify",
    "hyper",
    "reqwest",
    "metrics-exporter-prometheus",
    "tch",
    "torch-sys",
    "tonic",
];

/// Package name → the names of its dependencies, from `Cargo.lock`.
fn lock_graph() -> BTreeMap<String, Vec<String>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.lock");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let lock: toml::Value = toml::from_str(&text).expect("Cargo.lock is TOML");
    let mut graph: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for pkg in lock["package"].as_array().expect("[[package]] entries") {
        let name = pkg["name"].as_str().expect("package name").to_string();
        let deps: Vec<String> = pkg
            .get("dependencies")
            .and_then(|d| d.as_array())
            .map(|d| {
                d.iter()
                    // An entry is "name" or "name version" when two versions exist.
                    .filter_map(|v| v.as_str())
                    .map(|s| s.split(' ').next().unwrap_or(s).to_string())
                    .collect()
            })
            .unwrap_or_default();
        graph.entry(name).or_default().extend(deps);
    }
    graph
}

/// The first forbidden crate reachable from `root`, with the path to it.
fn io_path_from(graph: &BTreeMap<String, Vec<String>>, root: &str) -> Option<Vec<String>> {
    let mut parent: BTreeMap<String, String> = BTreeMap::new();
    let mut queue = VecDeque::from([root.to_string()]);
    while let Some(name) = queue.pop_front() {
        if FORBIDDEN.contains(&name.as_str()) {
            let mut path = vec![name.clone()];
            let mut at = name;
            while let Some(p) = parent.get(&at) {
                path.push(p.clone());
                at = p.clone();
            }
            path.reverse();
            return Some(path);
        }
        for dep in graph.get(&name).into_iter().flatten() {
            if dep != root && !parent.contains_key(dep) {
                parent.insert(dep.clone(), name.clone());
                queue.push_back(dep.clone());
            }
        }
    }
    None
}

#[test]
fn the_pure_crates_link_no_io_or_runtime_crate() {
    let graph = lock_graph();
    // The walk itself must see the adapters where they are, or it proves nothing.
    assert!(
        io_path_from(&graph, "tickmesh-io").is_some(),
        "the lock graph shows no adapter under tickmesh-io: the walk is broken"
    );
    // Dev-dependencies are in the lock too, so the graph is a superset of
    // what the crates link: an empty result is conclusive.
    for pure in ["tickmesh-core", "tickmesh-features"] {
        assert!(graph.contains_key(pure), "{pure} is not in Cargo.lock");
        if let Some(path) = io_path_from(&graph, pure) {
            panic!("{pure} links an I/O crate: {}", path.join(" → "));
        }
    }
}
