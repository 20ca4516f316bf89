#!/usr/bin/env bash
# The main job on the bundled sample: check the backbone, extract the
# 300-image Fashion-MNIST sample into a store, train a head, evaluate it,
# predict a few images, export one deployable model. Outputs go to out/.
set -euo pipefail
cd "$(dirname "$0")/.."
ES=.venv/bin/embedstore
OUT=${OUT:-out}
SAMPLE=data/fashion-mnist-sample
mkdir -p "$OUT"
$ES backbone check
$ES extract "$SAMPLE" "$OUT/sample.h5"
$ES info "$OUT/sample.h5"
$ES train "$OUT/sample.h5" "$OUT/logreg" --val-fraction 0.3 --overwrite
$ES evaluate "$OUT/logreg"
$ES predict "$OUT/logreg" "$SAMPLE/Bag/test-00018.png" "$SAMPLE/Sneaker/test-00009.png" \
    "$SAMPLE/Trouser/test-00002.png" --top-k 2
$ES export "$OUT/logreg" "$OUT/exported" --overwrite
