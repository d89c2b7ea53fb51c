# syntax=docker/dockerfile:1
#
# The shop's `users` service. Build from the repository root (the Cargo workspace):
#
#   docker build -f examples/shop/services/users.Dockerfile -t ghcr.io/weir-dev/shop-users:0.1.0 .

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,id=weir-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=weir-target,target=/src/target,sharing=locked \
    cargo build --release --locked -p weir-example-shop --bin shop-users \
 && install -D -m 0755 target/release/shop-users /out/shop-users \
 && install -d -m 0777 /out/data

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/shop-users /usr/local/bin/shop-users
# Its own store; mount a volume here to keep it across restarts of the pod.
COPY --from=build --chown=65532:65532 /out/data /var/lib/shop
ENV DATA_DIR=/var/lib/shop PORT=8080
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/shop-users"]
