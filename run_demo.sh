#!/usr/bin/env bash
# Newcomer demo: virtualenv + install, then train and test a model on the embedded Textures dataset (offline, CPU).
set -euo pipefail
cd "$(dirname "$0")"
[ -d .venv ] || python3 -m venv .venv
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e .
export HF_HUB_OFFLINE=1
anomalib-ext demo "$@"
