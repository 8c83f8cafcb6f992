//! Compiles the .proto files in `proto/` in pure Rust (protox), so no system protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files =
        ["proto/kv.proto", "proto/auth.proto", "proto/rpc.proto", "proto/v3election.proto", "proto/v3lock.proto", "proto/keel.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    // serde (proto3 JSON mapping, proto field names) for the JSON gateway.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    pbjson_build::Builder::new()
        .register_descriptors(&prost::Message::encode_to_vec(&fds))?
        .out_dir(&out)
        .preserve_proto_field_names()
        // As etcd's gateway (grpc-gateway with DiscardUnknown): unknown JSON fields are skipped.
        .ignore_unknown_fields()
        .build(&[".etcdserverpb", ".mvccpb", ".authpb", ".v3electionpb", ".v3lockpb"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
