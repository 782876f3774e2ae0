#!/usr/bin/env bash
# tests/mockrunner/install-locked-runner.sh: install the mock runner's locked dependencies
# (`npm ci` from peerdaemon/mock/runner/package-lock.json) into a cache outside the checkout, so
# tests/test_mock_runner_node.py can also run the runner on exactly the tree the lock pins (the
# rest of that file uses tests/interop/node_modules through NODE_PATH). Needs the npm registry:
# run it BEFORE `tests/isolated ...`, which has no network. Prints the cache directory.
#
# The cache is ${PD_RUNNER_CACHE:-/tmp/pd-runner-cache}/<first 16 hex digits of the lock's sha256>/
# holding package.json, package-lock.json and node_modules/. An existing complete one is reused.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
runner="$root/peerdaemon/mock/runner"
hash=$(sha256sum "$runner/package-lock.json" | cut -c1-16)
cache="${PD_RUNNER_CACHE:-/tmp/pd-runner-cache}"
dest="$cache/$hash"
if [ -f "$dest/node_modules/.package-lock.json" ]; then
  echo "$dest"
  exit 0
fi
mkdir -p "$cache"
work=$(mktemp -d "$cache/.install-XXXXXX")
trap 'rm -rf "$work"' EXIT
cp "$runner/package.json" "$runner/package-lock.json" "$work/"
(cd "$work" && npm ci --no-audit --no-fund >&2)
rm -rf "$dest"
mv "$work" "$dest"
trap - EXIT
echo "$dest"
