//! With the `grpc` feature: the tonic client and server stubs of the test kit's echo service
//! (`weir.test.Echo`), generated from a description in Rust (no .proto, no protoc).

fn main() {
    #[cfg(feature = "grpc")]
    {
        use tonic_build::manual::{Builder, Method, Service};
        let method = |name: &str, route: &str, client_streaming: bool, server_streaming: bool| {
            let mut m = Method::builder()
                .name(name)
                .route_name(route)
                .input_type("crate::grpc::Ask")
                .output_type("crate::grpc::Answer")
                .codec_path("tonic_prost::ProstCodec");
            if client_streaming {
                m = m.client_streaming();
            }
            if server_streaming {
                m = m.server_streaming();
            }
            m.build()
        };
        let echo = Service::builder()
            .name("Echo")
            .package("weir.test")
            .method(method("say", "Say", false, false))
            .method(method("count", "Count", false, true))
            .method(method("sum", "Sum", true, false))
            .method(method("chat", "Chat", true, true))
            .build();
        Builder::new().compile(&[echo]);
    }
}
