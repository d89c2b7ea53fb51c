#!/usr/bin/env bash
# Runs each weir-proxy fuzz target for a bounded time.
#
#   sidecar/fuzz/run.sh            # 60 s per target
#   FUZZ_SECONDS=600 sidecar/fuzz/run.sh config
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). Only stable Rust is assumed: RUSTC_BOOTSTRAP=1
# lets it use the sanitizer flags cargo-fuzz passes. The committed seeds in corpus/<target> are
# copied to a scratch directory so runs do not grow the repository; crashes land in
# artifacts/<target>/ and make the script fail.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${FUZZ_SECONDS:-60}"
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(config traceparent jwt)
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz missing: cargo install cargo-fuzz" >&2; exit 2; }
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t"
  cp -r "corpus/$t/." "$scratch/$t/"
  echo "== $t: ${seconds}s"
  cargo fuzz run -O "$t" "$scratch/$t" -- -max_total_time="$seconds" -max_len=8192 -print_final_stats=1 2>&1 \
    | grep -E '^(Done|stat::number_of_executed_units|==[0-9]+==|SUMMARY|.*panicked)' || true
  if compgen -G "artifacts/$t/crash-*" >/dev/null; then
    echo "crash found: $(ls artifacts/"$t"/crash-*)" >&2
    exit 1
  fi
done
echo "no crashes"
