#!/usr/bin/env bash
# mypy on the installed package layout: calibrators/ and kernels/ are quantlab.calibrators and
# quantlab.kernels (setuptools package-dir), which mypy cannot see through the editable finder.
# A tree of symlinks gives it the installed layout without copying anything.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tree="$root/build/typecheck"
rm -rf "$tree"
mkdir -p "$tree/quantlab"
for f in "$root"/quantlab/*; do ln -s "$f" "$tree/quantlab/$(basename "$f")"; done
ln -s "$root/calibrators" "$tree/quantlab/calibrators"
ln -s "$root/kernels" "$tree/quantlab/kernels"
cd "$tree"
read -r -a mypy <<< "${MYPY:-mypy}"
"${mypy[@]}" --config-file "$root/pyproject.toml" -p quantlab
