#!/usr/bin/env bash
# Rebuild the vendored Pingora crates from their pristine crates.io sources plus
# the infergate patches in vendor/patches/<crate>/, applied in order.
#   vendor/apply-patches.sh          rebuild vendor/pingora-proxy and vendor/pingora-core
#   vendor/apply-patches.sh --check  only check that each tree equals pristine + patches
# Needs curl, tar and patch (crates.io must be reachable, or the .crate file in
# cargo's download cache).
set -euo pipefail
cd "$(dirname "$0")"
VERSION=0.9.1
# crate name and the SHA-256 of its crates.io .crate file (Cargo.lock's checksum)
CRATES=(
  "pingora-proxy 8e3d5670490740405ecc8c6f75c3fcbce4d24f7adaffb355ca44550e7918e358"
  "pingora-core a535f47f65fdcb003f9e1df04cd18e614c128dfe9388acce3f211ae38ac14d68"
)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0
for entry in "${CRATES[@]}"; do
  read -r name sha <<<"$entry"
  crate="$work/$name-$VERSION.crate"
  cached=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$name-$VERSION.crate" 2>/dev/null | head -1 || true)
  if [ -n "$cached" ]; then cp "$cached" "$crate"; else
    curl -sSfL -o "$crate" "https://static.crates.io/crates/$name/$name-$VERSION.crate"
  fi
  echo "$sha  $crate" | sha256sum -c --quiet -
  tar xzf "$crate" -C "$work"
  src="$work/$name-$VERSION"
  # what the vendored copy does not carry
  rm -f "$src/Cargo.lock" "$src/.cargo_vcs_info.json" "$src/.cargo-ok"
  n=0
  for p in patches/"$name"/*.patch; do
    [ -e "$p" ] || continue
    patch -s -p1 -d "$src" < "$p"
    n=$((n + 1))
  done
  if [ "${1:-}" = "--check" ]; then
    if diff -r -x .cargo-ok "$src" "$name" >/dev/null; then
      echo "vendor/$name = $name $VERSION + $n patches"
    else
      diff -ru -x .cargo-ok "$src" "$name" | head -40
      echo "vendor/$name differs from pristine + patches" >&2
      status=1
    fi
  else
    rm -rf "$name"
    cp -r "$src" "$name"
    echo "vendor/$name rebuilt: $name $VERSION + $n patches"
  fi
done
exit $status
