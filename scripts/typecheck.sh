#!/usr/bin/env bash
# mypy cannot follow setuptools' editable finder (folders map to xdrive.* by package-dir),
# so check a hard-linked copy laid out as the installed package, and map paths back.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=.cache/typecheck
rm -rf "$tree" && mkdir -p "$tree/xdrive"
cp -l core/*.py "$tree/xdrive/"
for pkg in agent cloudinit launcher sandbox; do
  mkdir -p "$tree/xdrive/$pkg" && cp -l "$pkg"/*.py "$tree/xdrive/$pkg/"
done
export MYPYPATH="$tree"
check() { .venv/bin/mypy -p xdrive "$@" && .venv/bin/mypy tests bench "$@"; }
# pipefail: the pipeline fails when mypy does, whatever sed says.
if ! check "$@" 2>&1 | sed -e "s#^$tree/xdrive/\(agent\|cloudinit\|launcher\|sandbox\)/#\1/#" \
  -e "s#^$tree/xdrive/#core/#"; then
  exit 1
fi
