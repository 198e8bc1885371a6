//! With the `grpc` feature: compiles proto/grpc_service.proto with protox (a protobuf compiler
//! in Rust, so no `protoc` is needed) and generates the tonic service and client from it.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "grpc")]
    grpc();
}

#[cfg(feature = "grpc")]
fn grpc() {
    const PROTO: &str = "proto/grpc_service.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    let descriptors = match protox::compile([PROTO], ["proto"]) {
        Ok(d) => d,
        Err(e) => panic!("cannot compile {PROTO}: {e}"),
    };
    if let Err(e) = tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .build_transport(false)
        // Tensor bytes as `bytes::Bytes`: decoding slices the received buffer instead of
        // copying each tensor into its own Vec.
        .bytes(".inference.ModelInferRequest.raw_input_contents")
        .bytes(".inference.ModelInferResponse.raw_output_contents")
        .compile_fds(descriptors)
    {
        panic!("cannot generate the gRPC code from {PROTO}: {e}");
    }
}
