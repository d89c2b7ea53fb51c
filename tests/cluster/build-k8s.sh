#!/usr/bin/env bash
# Build Kubernetes 1.20.2 from Debian's source package `kubernetes` with
# Debian's golang-go (GOPATH mode), plus a static pause binary.
#
# Output: $WEIR_CLUSTER_CACHE/<source-version>/bin/{kube-apiserver,
#   kube-controller-manager,kube-scheduler,kubelet,kube-proxy,pause}
# The Go build cache lives beside it, so a rebuild of the same version is quick,
# and a finished build is reused as is (stamp file bin/.complete).
# Prints the bin directory on stdout.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SRCVER=$(k8s_source_version)
[[ -n "$SRCVER" ]] || die "apt-cache knows no source package 'kubernetes' (deb-src line missing? run up.sh)"
BASE="$WEIR_CLUSTER_CACHE/$SRCVER"
BIN="$BASE/bin"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)

# Bump when the recipe below changes what is built: a cached build with another
# recipe is rebuilt (the Go build cache keeps that short where it can).
RECIPE=2   # 2: vendored reflect2 1.0.1 replaced by Debian's 1.0.2
if [[ -f "$BIN/.complete" && "$(cat "$BIN/.complete")" == "$RECIPE" ]]; then
  log "using cached Kubernetes build in $BIN"
  echo "$BIN"; exit 0
fi

mkdir -p "$BASE/src" "$BIN"
# 1. Source: the .dsc, the orig tarball (with vendor/) and Debian's patches.
if ! ls "$BASE"/src/*.dsc >/dev/null 2>&1; then
  log "downloading Debian source package kubernetes $SRCVER"
  (cd "$BASE/src" && apt-get source --download-only "kubernetes=$SRCVER" >&2)
fi
TREE="$BASE/tree"
if [[ ! -f "$TREE/.extracted" ]]; then
  rm -rf "$TREE"
  log "extracting (dpkg-source -x applies Debian's patches)"
  dpkg-source --no-check -x "$(ls "$BASE"/src/*.dsc | head -1)" "$TREE" >&2
  touch "$TREE/.extracted"
fi

# Go >= 1.18 changed the runtime's map iterator; the vendored
# github.com/modern-go/reflect2 v1.0.1 then makes json-iterator crash the
# apiserver ("unexpected fault address", sortKeysMapEncoder) whenever it encodes
# a map, e.g. on creating a CustomResourceDefinition. Debian's
# golang-github-modern-go-reflect2-dev (1.0.2) has the fix: vendor it instead.
R2=/usr/share/gocode/src/github.com/modern-go/reflect2
if grep -q '^# github.com/modern-go/reflect2 v1.0.1' "$TREE/vendor/modules.txt" && [[ ! -f "$TREE/.reflect2-debian" ]]; then
  [[ -f "$R2/go_above_118.go" ]] || die "need Debian's golang-github-modern-go-reflect2-dev (>= 1.0.2) in $R2"
  log "replacing vendored reflect2 v1.0.1 with Debian's $(dpkg-query -W -f='${Version}' golang-github-modern-go-reflect2-dev)"
  rm -rf "$TREE/vendor/github.com/modern-go/reflect2"
  cp -r "$R2" "$TREE/vendor/github.com/modern-go/reflect2"
  rm -f "$TREE/vendor/github.com/modern-go/reflect2/go.mod"
  touch "$TREE/.reflect2-debian"
fi

# 2. GOPATH mode: the tree linked at $GOPATH/src/k8s.io/kubernetes.
export GOPATH="$BASE/gopath" GOCACHE="$BASE/gocache" GO111MODULE=off CGO_ENABLED=0 GOFLAGS=
mkdir -p "$GOPATH/src/k8s.io" "$GOCACHE"
ln -sfn "$TREE" "$GOPATH/src/k8s.io/kubernetes"
cd "$GOPATH/src/k8s.io/kubernetes"
export PWD="$GOPATH/src/k8s.io/kubernetes"
log "go: $(go version)"

# 3. pkg/generated/openapi/zz_generated.openapi.go (absent from the tarball),
#    made the way build/root/Makefile.generated_files does it.
OPENAPI_OUT=pkg/generated/openapi/zz_generated.openapi.go
if [[ ! -s "$OPENAPI_OUT" ]]; then
  log "building openapi-gen"
  go build -o "$BASE/tools/openapi-gen" k8s.io/kubernetes/vendor/k8s.io/kube-openapi/cmd/openapi-gen
  # Every directory with Go files outside vendor/, ./_* and ./.*, staging/src
  # named as its vendor/ equivalent; keep those with a +k8s:openapi-gen= tag.
  mapfile -t dirs < <(
    find -H . \( -path './_*' -o -path './.*' -o -path ./vendor \) -prune -o -type f -name '*.go' -print \
      | sed 's|^./staging/src|vendor|; s|/[^/]*$||; s|^./||' | LC_ALL=C sort -u \
      | while read -r d; do
          find "$d" -maxdepth 1 -type f -name '*.go' -print0 | xargs -0 -r grep -l '^// *+k8s:' \
            | xargs -r grep -l '+k8s:openapi-gen=' || true
        done \
      | xargs -r -n1 dirname | LC_ALL=C sort -u \
      | grep -v -e '^vendor/k8s.io/code-generator/' -e '^vendor/k8s.io/sample-apiserver/')
  log "openapi-gen over ${#dirs[@]} packages"
  inputs=$(printf 'k8s.io/kubernetes/%s,' "${dirs[@]}"); inputs=${inputs%,}
  "$BASE/tools/openapi-gen" --logtostderr -v 1 -i "$inputs" \
    -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
    -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt \
    -r "$BASE/openapi-violations.report" -o "$GOPATH/src" >"$BASE/openapi-gen.log" 2>&1 \
    || { tail -20 "$BASE/openapi-gen.log" >&2; die "openapi-gen failed"; }
  if diff -q "$BASE/openapi-violations.report" api/api-rules/violation_exceptions.list >/dev/null; then
    log "openapi rule-violation report matches api/api-rules/violation_exceptions.list"
  else
    log "WARNING: openapi rule-violation report differs from api/api-rules/violation_exceptions.list"
  fi
  [[ -s "$OPENAPI_OUT" ]] || die "openapi-gen produced no $OPENAPI_OUT"
fi

# 4. One go build for the five binaries; version stamped in both version packages.
BUILD_DATE=$(date -u -d "@$(stat -c %Y "$TREE/go.mod")" +%Y-%m-%dT%H:%M:%SZ)
ldflags="-s -w"
for pkg in k8s.io/kubernetes/vendor/k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=20"
  ldflags+=" -X $pkg.gitTreeState=archive -X $pkg.gitCommit=debian-$SRCVER -X $pkg.buildDate=$BUILD_DATE"
done
pkgs=(); for b in "${BINARIES[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
log "go build ${BINARIES[*]} (cold: about 7-10 minutes on 2 cores)"
start=$SECONDS
go build -o "$BIN/" -ldflags "$ldflags" "${pkgs[@]}"
log "go build done in $((SECONDS - start))s"

# 5. The pause binary, static, from the tree's build/pause/linux/pause.c.
gcc -Os -Wall -static -DVERSION=v3.4-debian -o "$BIN/pause" build/pause/linux/pause.c

for b in "${BINARIES[@]}" pause; do [[ -x "$BIN/$b" ]] || die "missing $BIN/$b"; done
"$BIN/kube-apiserver" --version >&2
echo "$RECIPE" > "$BIN/.complete"
echo "$BIN"
