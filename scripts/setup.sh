#!/usr/bin/env bash
# Create .venv and install asyncload with everything its tests, benchmarks, docs and demo need.
# torch is pinned here (an unpinned torch may pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" -e ".[test,bench,docs]"
# Peers of benchmarks/bench_http.py, with --no-deps on purpose: torchdata 0.11 declares
# torch (unpinned: pip could swap the CPU torch above for another build) and requests,
# urllib3, which torchdata.nodes does not import; SPDL's three wheels need only numpy,
# already installed. Not in pyproject's `bench` extra for the same reason.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps \
    "torchdata==0.11.0" "spdl==0.8.0" "spdl_core==0.8.0" "spdl_io==0.8.0"
