#!/usr/bin/env bash
# Set everything up on a fresh clone, then run lint, type checks, the tests and the
# benchmark smoke run. Servers the tests need are started by the test fixtures.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check asyncload tests benchmarks
.venv/bin/ruff format --check asyncload tests benchmarks
.venv/bin/mypy
.venv/bin/mkdocs build --strict --site-dir "$(mktemp -d)"  # docs site: zero warnings
.venv/bin/python -m pytest -q -p no:cacheprovider
.venv/bin/python benchmarks/run_all.py --quick
