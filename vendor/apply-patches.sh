#!/usr/bin/env bash
# Rebuild vendor/pingora-proxy from the pristine crates.io source of
# pingora-proxy 0.9.1 plus the infergate patches in vendor/patches/, in order.
#   vendor/apply-patches.sh          rebuild vendor/pingora-proxy
#   vendor/apply-patches.sh --check  only check that the tree equals pristine + patches
# Needs curl, tar and patch (crates.io must be reachable, or the .crate file in
# cargo's download cache).
set -euo pipefail
cd "$(dirname "$0")"
VERSION=0.9.1
SHA256=8e3d5670490740405ecc8c6f75c3fcbce4d24f7adaffb355ca44550e7918e358
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
crate="$work/pingora-proxy-$VERSION.crate"
cached=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/pingora-proxy-$VERSION.crate 2>/dev/null | head -1 || true)
if [ -n "$cached" ]; then cp "$cached" "$crate"; else
  curl -sSfL -o "$crate" "https://static.crates.io/crates/pingora-proxy/pingora-proxy-$VERSION.crate"
fi
echo "$SHA256  $crate" | sha256sum -c --quiet -
tar xzf "$crate" -C "$work"
src="$work/pingora-proxy-$VERSION"
# what the vendored copy does not carry
rm -f "$src/Cargo.lock" "$src/.cargo_vcs_info.json" "$src/.cargo-ok"
for p in patches/*.patch; do
  patch -s -p1 -d "$src" < "$p"
done
if [ "${1:-}" = "--check" ]; then
  if diff -r -x .cargo-ok "$src" pingora-proxy >/dev/null; then
    echo "vendor/pingora-proxy = pingora-proxy $VERSION + $(ls patches/*.patch | wc -l) patches"
  else
    diff -ru -x .cargo-ok "$src" pingora-proxy | head -40
    echo "vendor/pingora-proxy differs from pristine + patches" >&2
    exit 1
  fi
else
  rm -rf pingora-proxy
  cp -r "$src" pingora-proxy
  echo "vendor/pingora-proxy rebuilt: pingora-proxy $VERSION + $(ls patches/*.patch | wc -l) patches"
fi
