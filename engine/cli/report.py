"""``causalscan report DIR``: one self-contained HTML page of what a command saved in DIR."""

from __future__ import annotations

import sys

from causalscan import report
from causalscan.cli.options import command


def run(args) -> dict:
    path = report.write(args.out, args.html)
    size = path.stat().st_size
    print(f"report: {path} ({size / 2**20:.1f} MiB)", file=sys.stderr)
    return {"report": str(path), "bytes": size}


def add(sub) -> None:
    p = command(
        sub,
        "report",
        run,
        help="write report.html from a result directory",
        description="One self-contained HTML page (plotly inline, no network) of what scan, patch, trace or "
        "elicit saved in DIR: heatmaps per sweep, estimate against exact, the ranked table, "
        "tracing grids, elicited completions.",
    )
    p.add_argument("out", metavar="DIR", help="a directory written by scan, patch, trace or elicit --out")
    p.add_argument("--html", default=None, help="write the page here instead of DIR/report.html")
    p.add_argument("--json", action="store_true", help="print the result document on stdout")
