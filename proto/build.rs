//! Compiles the API's .proto files with a vendored protoc, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_build::configure()
        // Ours: a message that does not decode is INVALID_ARGUMENT, not INTERNAL (see src/codec.rs).
        .codec_path("crate::codec::ProstCodec")
        // Maps as BTreeMap: a message encodes to the same bytes every time (a HashMap's order is
        // random per instance), which the at-most-once fingerprint of a request relies on.
        .btree_map(["."])
        .file_descriptor_set_path(out_dir.join("titus_descriptor.bin"))
        .compile_protos(
            &[
                "proto/titus.proto",
                "proto/peer.proto",
                // Titus's own public V3 API (package com.netflix.titus), served beside ours.
                "proto/netflix/titus/titus_job_api.proto",
                "proto/netflix/titus/titus_loadbalancer_api.proto",
                "proto/netflix/titus/titus_health.proto",
                "proto/netflix/titus/titus_autoscale_api.proto",
                "proto/netflix/titus/titus_eviction_api.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
