#!/usr/bin/env bash
# Proves that vendor/quinn-proto and vendor/quinn are quinn-proto 0.11.19 and quinn 0.11.12 from
# crates.io (the checksums Cargo.lock had before the patches) with vendor/<crate>.patch applied,
# and nothing else: downloads each crate (or takes it from cargo's cache), checks it, patches a
# copy and compares.
# With --test it then runs each crate's own unit tests on the vendored copy (with the lock file
# the crate shipped, and the other vendored crate in place of its registry version), so the
# patches are held to upstream's tests too.
set -euo pipefail
cd "$(dirname "$0")"
vendor=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# name version sha256 (crates.io's checksum) and the features its tests run with
crates=(
  "quinn-proto 0.11.19 0e750cca55fe4f0439a15d0bb529da9651e79993e8e72c61a899a36d462befbe rustls-ring,log"
  "quinn 0.11.12 4051e23e9185c255a7e33ef59cdbca87a22d359052eecd22fc6b901fb37d9d11 runtime-tokio,rustls-ring,log"
)

for entry in "${crates[@]}"; do
  read -r name version sha256 features <<<"$entry"
  crate="$work/$name.crate"
  cached=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$name-$version.crate" 2>/dev/null | head -1 || true)
  if [ -n "$cached" ]; then
    cp "$cached" "$crate"
  else
    curl -sSfL --retry 3 -o "$crate" "https://static.crates.io/crates/$name/$name-$version.crate" \
      || { echo "vendor/check.sh: cannot download $name $version from crates.io"; exit 1; }
  fi
  echo "$sha256  $crate" | sha256sum -c --quiet - \
    || { echo "vendor/check.sh: $name-$version.crate does not have crates.io's checksum"; exit 1; }
  tar xzf "$crate" -C "$work"
  up="$work/$name-$version"
  cp "$up/Cargo.lock" "$work/$name.lock"
  # Cargo's own bookkeeping files, not source.
  rm -f "$up/.cargo_vcs_info.json" "$up/Cargo.lock"
  patch -s -p1 -d "$up" < "$name.patch"
  if ! diff -r "$up" "$name"; then
    echo "vendor/check.sh: vendor/$name differs from $name $version + $name.patch (above)"
    exit 1
  fi
  echo "vendor/$name = $name $version (sha256 ${sha256:0:16}…) + $name.patch ($(grep -c '^@@' "$name.patch") hunks)"
done

if [ "${1:-}" = "--test" ]; then
  for entry in "${crates[@]}"; do
    read -r name _ _ features <<<"$entry"
    t="$work/t/$name"
    mkdir -p "$t" && cp -r "$name/." "$t/" && cp "$work/$name.lock" "$t/Cargo.lock"
    # quinn's tests run against the patched quinn-proto, as the workspace builds it.
    [ "$name" = quinn-proto ] || printf '\n[patch.crates-io]\nquinn-proto = { path = "%s/quinn-proto" }\n' "$vendor" >> "$t/Cargo.toml"
    (cd "$t" && CARGO_TARGET_DIR="$work/target" cargo test --quiet --lib --no-default-features \
      --features "$features" 2>&1 | tail -3) | tee "$work/test.log"
    grep -q "test result: ok" "$work/test.log" || { echo "vendor/check.sh: $name's own tests failed on vendor/$name"; exit 1; }
  done
fi
