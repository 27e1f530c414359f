//! Compiles the small subset of etcd's v3 API that the comparison needs.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_build::configure().build_server(false).compile_protos(&["proto/etcd_subset.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
