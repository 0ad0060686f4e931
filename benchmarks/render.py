"""The older way to re-render the HTTP section, kept so that the old command still works:

    .venv/bin/python benchmarks/render.py [benchmarks/results/http.json] [docs/benchmarks.md]

is ``bench_http.py --from JSON --render PAGE``: it replaces the HTTP section and keeps the
others. To re-render every section: ``benchmarks/run_all.py --from-results``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_http, harness
from benchmarks.common import RESULTS, ROOT


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    src = args[0] if args else str(RESULTS / "http.json")
    dst = args[1] if len(args) > 1 else str(ROOT / "docs" / "benchmarks.md")
    return harness.main(bench_http.BENCH, ["--from", src, "--render", dst])


if __name__ == "__main__":
    sys.exit(main())
