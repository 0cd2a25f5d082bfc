#!/usr/bin/env bash
# Proves that vendor/quinn-proto is quinn-proto 0.11.19 from crates.io (the checksum Cargo.lock
# had before the patch) with vendor/quinn-proto.patch applied, and nothing else: downloads the
# crate (or takes it from cargo's cache), checks it, patches a copy and compares.
# With --test it then runs quinn-proto's own unit tests on vendor/quinn-proto (with the lock file
# the crate shipped), so the patches are held to upstream's tests too.
set -euo pipefail
cd "$(dirname "$0")"
version=0.11.19
sha256=0e750cca55fe4f0439a15d0bb529da9651e79993e8e72c61a899a36d462befbe
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
crate="$work/quinn-proto.crate"
cached=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/quinn-proto-$version.crate 2>/dev/null | head -1 || true)
if [ -n "$cached" ]; then
  cp "$cached" "$crate"
else
  curl -sSfL --retry 3 -o "$crate" "https://static.crates.io/crates/quinn-proto/quinn-proto-$version.crate" \
    || { echo "vendor/check.sh: cannot download quinn-proto $version from crates.io"; exit 1; }
fi
echo "$sha256  $crate" | sha256sum -c --quiet - \
  || { echo "vendor/check.sh: quinn-proto-$version.crate does not have crates.io's checksum"; exit 1; }
tar xzf "$crate" -C "$work"
up="$work/quinn-proto-$version"
# Cargo's own bookkeeping files, not source.
rm -f "$up/.cargo_vcs_info.json" "$up/Cargo.lock"
patch -s -p1 -d "$up" < quinn-proto.patch
if ! diff -r "$up" quinn-proto; then
  echo "vendor/check.sh: vendor/quinn-proto differs from quinn-proto $version + quinn-proto.patch (above)"
  exit 1
fi
echo "vendor/quinn-proto = quinn-proto $version (sha256 ${sha256:0:16}…) + quinn-proto.patch ($(grep -c '^@@' quinn-proto.patch) hunks)"
if [ "${1:-}" = "--test" ]; then
  tar xzf "$crate" -C "$work" "quinn-proto-$version/Cargo.lock"
  mkdir "$work/t" && cp -r quinn-proto "$work/t/" && cp "$up/Cargo.lock" "$work/t/quinn-proto/"
  (cd "$work/t/quinn-proto" && CARGO_TARGET_DIR="$work/target" cargo test --quiet --lib --no-default-features \
    --features rustls-ring,log 2>&1 | tail -3) | tee "$work/test.log"
  grep -q "test result: ok" "$work/test.log" || { echo "vendor/check.sh: quinn-proto's own tests failed on vendor/quinn-proto"; exit 1; }
fi
