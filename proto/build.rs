//! Generates the tonic code with a vendored `protoc` (no system protoc needed)
//! and a file descriptor set for gRPC reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("tickmesh_descriptor.bin"))
        // A job's state also answers `GetJob` on the mesh (bincode, serde).
        .type_attribute(
            ".tickmesh.v1.JobStatus",
            "#[derive(serde::Serialize, serde::Deserialize)]",
        )
        .compile_protos(&["tickmesh/v1/admin.proto"], &["."])?;
    println!("cargo:rerun-if-changed=tickmesh/v1/admin.proto");
    Ok(())
}
