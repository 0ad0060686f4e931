#!/usr/bin/env bash
# Set everything up on a fresh clone, then run the demo: a local HTTP server with 20 ms of
# latency per request, streamed through asyncload into a small torch training loop, next
# to the same run with torch.utils.data.DataLoader.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python benchmarks/demo.py "$@"
