//! The tonic client and server stubs of `shop.Inventory` (see `proto/inventory.proto`),
//! generated from a description in Rust: no protoc needed to build the example.

fn main() {
    use tonic_build::manual::{Builder, Method, Service};
    let method = |name: &str, route: &str, server_streaming: bool| {
        let m = Method::builder()
            .name(name)
            .route_name(route)
            .input_type("crate::StockQuery")
            .output_type("crate::Stock")
            .codec_path("tonic_prost::ProstCodec");
        if server_streaming {
            m.server_streaming().build()
        } else {
            m.build()
        }
    };
    let inventory = Service::builder()
        .name("Inventory")
        .package("shop")
        .method(method("check", "Check", false))
        .method(method("watch", "Watch", true))
        .build();
    Builder::new().compile(&[inventory]);
}
