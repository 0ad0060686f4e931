#!/usr/bin/env bash
# Create .venv and install asyncload with everything its tests, benchmarks and demo need.
# torch is pinned here (an unpinned torch may pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" -e ".[test,bench]"
