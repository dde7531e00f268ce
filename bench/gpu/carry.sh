#!/usr/bin/env bash
# Download the pure-Python wheels that `python -m bench.gpu` needs beyond torch and triton into
# bench/gpu/wheels/ (git-ignored), for a GPU machine without network. See bench/gpu/README.md.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dest="${1:-$here/wheels}"
mkdir -p "$dest"
python -m pip download --no-deps --only-binary=:all: -d "$dest" "fla-core==0.6.0" "einops>=0.7"
echo "wheels in $dest:"
ls -1 "$dest"
