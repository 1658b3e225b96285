#!/usr/bin/env bash
# Fails when a tracked file is over 1 MiB outside load-tests/results/ (benchmark
# results that docs cite are the one exception). Run by `make lint`.
set -euo pipefail
cd "$(dirname "$0")/.."
limit=$((1024 * 1024))
bad=0
while IFS= read -r -d '' f; do
  case "$f" in load-tests/results/*) continue ;; esac
  [ -f "$f" ] || continue
  size=$(stat -c %s "$f")
  if [ "$size" -gt "$limit" ]; then
    echo "tracked file over 1 MiB: $f ($size bytes)" >&2
    bad=1
  fi
done < <(git ls-files -z)
exit $bad
