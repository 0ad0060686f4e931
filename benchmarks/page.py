"""``docs/benchmarks.md``: one page of marker-delimited sections, one per benchmark.

Each benchmark owns the section between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``
(``NAME`` as in ``benchmarks/results/NAME.json``). :func:`write_section` replaces that
section only, or inserts it in :data:`ORDER`, and keeps everything else on the page as
it is; it also refreshes the intro and the contents, which are sections of their own.
Also here: the Markdown pieces every section uses (result tables, the run line).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import write_atomic

INTRO = "intro"
CONTENTS = "contents"
# Where a section goes when the page does not have it yet; unknown names go last.
ORDER = (INTRO, CONTENTS, "http", "memory", "scaling", "s3", "tar", "images", "padding", "cache")

_BEGIN = re.compile(
    # The canonical form is "<!-- NAME:begin -->"; the older "<!-- NAME-benchmark: begin
    # (...) -->" is read too, so that a page (or a branch) written before is still spliced.
    r"<!--\s*(?P<name>[A-Za-z0-9_.-]+?)(?:-benchmark)?:\s*begin\b[^>]*-->"
)


def begin_marker(name: str) -> str:
    return f"<!-- {name}:begin -->"


def end_marker(name: str) -> str:
    return f"<!-- {name}:end -->"


@dataclass(frozen=True)
class Section:
    name: str
    start: int  # offset of the begin marker
    end: int  # offset just past the end marker
    text: str  # what lies between the markers


def sections(page: str) -> list[Section]:
    """The marker-delimited sections of ``page``, in page order."""
    out: list[Section] = []
    pos = 0
    while (begin := _BEGIN.search(page, pos)) is not None:
        name = begin.group("name")
        end_re = re.compile(rf"<!--\s*{re.escape(name)}(?:-benchmark)?:\s*end\s*-->")
        end = end_re.search(page, begin.end())
        if end is None:  # an unclosed marker: not a section; go on after it
            pos = begin.end()
            continue
        out.append(Section(name, begin.start(), end.end(), page[begin.end() : end.start()]))
        pos = end.end()
    return out


def splice(page: str, name: str, body: str) -> str:
    """``page`` with section ``name`` replaced by ``body`` (markers added), or with it
    inserted before the first section that :data:`ORDER` puts after it (else appended).
    Nothing else on the page changes."""
    block = f"{begin_marker(name)}\n\n{body.strip()}\n\n{end_marker(name)}"
    present = sections(page)
    for section in present:
        if section.name == name:
            return page[: section.start] + block + page[section.end :]
    rank = _rank(name)
    for section in present:
        if _rank(section.name) > rank:
            return page[: section.start] + block + "\n\n" + page[section.start :]
    return page.rstrip("\n") + ("\n\n" if page.strip() else "") + block + "\n"


def _rank(name: str) -> int:
    return ORDER.index(name) if name in ORDER else len(ORDER)


def write_section(
    path: Path, name: str, body: str, *, machine: dict[str, Any] | None = None
) -> None:
    """Put section ``name`` (Markdown starting with its ``## `` heading) into the page at
    ``path``, keeping every other section; refresh the contents, and the intro when
    ``machine`` (what the section was measured on) is given or the page has none."""
    page = path.read_text() if path.is_file() else ""
    if machine is not None or not any(s.name == INTRO for s in sections(page)):
        page = splice(page, INTRO, intro(machine))
    page = splice(page, name, body)
    page = splice(page, CONTENTS, contents(page))
    write_atomic(path, page)
    print(f"wrote the {name} section of {path}")


def refresh_contents(path: Path) -> None:
    """Rebuild the contents of the page at ``path`` (after a section was written by code
    that does not go through :func:`write_section`)."""
    page = path.read_text()
    updated = splice(page, CONTENTS, contents(page))
    if updated != page:
        write_atomic(path, updated)


def intro(machine: dict[str, Any] | None) -> str:
    """The top of the page: what is measured and how, and on what machine."""
    if machine is None:
        where = "- Machine: each section gives its own run."
    else:
        where = (
            f"- Machine: {machine['cpu_count']} cores ({machine['cpu_model']}), "
            f"{machine['memory_gib']} GiB, {machine['platform']}; Python {machine['python']}, "
            f"torch {machine.get('torch')}, asyncload {machine.get('asyncload')}. The local "
            "servers (HTTP, S3) run on the same cores as the loaders, but for the HTTP "
            "section's split-cores runs."
        )
    return "\n".join(
        [
            "# Benchmarks",
            "",
            "<!-- Generated from benchmarks/results/*.json by benchmarks/run_all.py (or one "
            "benchmark's --render): do not edit by hand. -->",
            "",
            "asyncload side by side with what a PyTorch user loads data with today: a "
            "hand-written asyncio client, `torch.utils.data.DataLoader` worker processes, "
            "WebDataset, raw S3 clients. How to read the numbers:",
            "",
            "- **Side by side, in one run.** Every peer in a section ran in the same command, "
            "on the same machine, against the same local server or files. Configurations are "
            "interleaved over rounds (each round runs every configuration once, starting at a "
            "different one), each run in a fresh child process; tables give the median over "
            "the rounds and the range (lowest to highest). Compare rows and ratios within a "
            "section: absolute figures move by ±20 % or more with the machine's load (each "
            "section gives its load average), so never compare them with another page.",
            "- **samples/s** (objects/s, images/s): the steady rate from the first batch on, "
            "the slope of a least-squares line through the batches' arrivals (time, samples "
            "so far). DataLoader workers deliver whole batches in waves; the fit counts a "
            "wave as the time it took, where samples over the time from the first batch to "
            "the last credited the rest of the first wave as free.",
            "- **first batch**: from building the loader or client to receiving the first "
            "batch, worker start-up included.",
            "- **peak RSS**: peak of the resident memory summed over the consumer process and "
            "all its children (DataLoader workers, `curl` processes), sampled every 50 ms. "
            "Pages that forked workers share count once per worker, as `ps` totals and a "
            "container's memory accounting count them.",
            "- **CPU µs/sample**: CPU time of that process tree from the first batch to the "
            "last, per sample; neither the server's nor the RSS sampler's.",
            "- **Checked**: every sample's bytes (or decoded image) are checked, and each must "
            "arrive exactly once; a wrong answer fails the command, slowness never does.",
            where,
            "",
            "Every benchmark, one after the other (about 30 minutes on 2 cores); the raw "
            "results are in `benchmarks/results/*.json`:",
            "",
            "```sh",
            ".venv/bin/python benchmarks/run_all.py                 # run all, rewrite this "
            "page and docs/img/*.png",
            ".venv/bin/python benchmarks/run_all.py --quick         # smoke run (CI): "
            "writes nothing here",
            ".venv/bin/python benchmarks/run_all.py --from-results  # re-render this page "
            "from the stored results",
            "```",
        ]
    )


def contents(page: str) -> str:
    """A list of links to the page's sections, by their first ``## `` heading."""
    lines = ["## Contents", ""]
    for section in sections(page):
        if section.name in (INTRO, CONTENTS):
            continue
        heading = next(
            (line[3:].strip() for line in section.text.splitlines() if line.startswith("## ")),
            section.name,
        )
        lines.append(f"- [{heading}](#{anchor(heading)})")
    return "\n".join(lines)


def anchor(heading: str) -> str:
    """The link anchor GitHub (and mkdocs) give a heading: lower case, punctuation
    dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


# --------------------------------------------------------------------------- Markdown pieces


def num(x: float | None, spec: str) -> str:
    """``x`` formatted, or ``n/a`` for a missing value."""
    return "n/a" if x is None else format(x, spec)


def loadavg(values: Sequence[float] | None) -> str:
    return "n/a" if not values else ", ".join(f"{v:.2f}" for v in values)


def spread(values: Iterable[float | None]) -> str:
    """``lowest to highest`` of the rounds, or ``n/a`` with fewer than two."""
    runs = [x for x in values if x is not None]
    return f"{min(runs):,.0f} to {max(runs):,.0f}" if len(runs) > 1 else "n/a"


@dataclass(frozen=True)
class Column:
    """An extra column of a results table: its header and how a row fills it."""

    header: str
    cell: Callable[[dict[str, Any]], str]
    align: str = "---:"


def results_table(
    rows: Iterable[dict[str, Any]],
    label: Callable[[dict[str, Any]], str],
    *,
    unit: str = "sample",
    first: str = "loader",
    lead: Sequence[Column] = (),
    tail: Sequence[Column] = (),
) -> list[str]:
    """The Markdown table of summary rows (see ``harness.summarize``): per row, its
    median throughput and range, first batch, peak RSS, CPU per ``unit`` and runs ok;
    ``lead`` columns go after the label, ``tail`` columns before "runs ok"."""
    headers = [
        first,
        *(c.header for c in lead),
        f"{unit}s/s",
        f"{unit}s/s range",
        "first batch (s)",
        "peak RSS (MiB)",
        f"CPU µs/{unit}",
        *(c.header for c in tail),
        "runs ok",
    ]
    aligns = ["---", *(c.align for c in lead), *["---:"] * 5, *(c.align for c in tail), "---:"]
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join(aligns) + " |"]
    for row in rows:
        cells = [
            label(row),
            *(c.cell(row) for c in lead),
            num(row["samples_per_s"], ",.0f"),
            spread(row["samples_per_s_all"]),
            num(row["first_batch_s"], ".3f"),
            num(row["peak_rss_mib"], ",.0f"),
            num(row["cpu_us_per_sample"], ".0f"),
            *(c.cell(row) for c in tail),
            f"{row['ok_runs']}/{row['runs']}",
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def run_line(meta: dict[str, Any], what: str = "each run a fresh process") -> str:
    """How this section's numbers were made: mode, rounds, when, how long, the load."""
    mode = "quick smoke mode" if meta.get("quick") else "full mode"
    return (
        f"This section: {mode}, {meta['rounds']} interleaved round(s), {what}, run on "
        f"{meta['started']}, {meta['duration_s']:.0f} s in all; medians. Load average "
        f"(1, 5, 15 min) before the run: {loadavg(meta.get('loadavg_before'))}; after: "
        f"{loadavg(meta.get('loadavg_after'))}."
    )


def command_block(meta: dict[str, Any]) -> list[str]:
    """The command that reproduces this section."""
    return [
        "```sh",
        f".venv/bin/python {meta['command'].removeprefix('python ')} --render docs/benchmarks.md",
        "```",
    ]


def failed_runs(
    rows: Iterable[dict[str, Any]], label: Callable[[dict[str, Any]], str]
) -> list[str]:
    """A "Failed runs" list, or nothing when every run passed."""
    errors = [(label(row), e) for row in rows for e in row["errors"]]
    if not errors:
        return []
    return ["### Failed runs", "", *(f"- {name}: `{e}`" for name, e in errors), ""]
