#!/usr/bin/env bash
# The main job on the bundled sample: check the backbone, extract the
# 300-image Fashion-MNIST sample into a store, describe it.
set -euo pipefail
cd "$(dirname "$0")/.."
ES=.venv/bin/embedstore
OUT=${OUT:-out}
mkdir -p "$OUT"
$ES backbone check
$ES extract data/fashion-mnist-sample "$OUT/sample.h5"
$ES info "$OUT/sample.h5"
