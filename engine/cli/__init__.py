"""Command line: ``causalscan <command> [options]``; ``--json`` prints one JSON document on stdout,
progress goes to stderr. Exit status: 0 success, 2 bad input (one line naming file, line, field),
1 internal failure, 130 interrupted.

One module per command (its options beside its handler); :mod:`.options` holds the option groups
several share and :mod:`.job` what they share at run time.
May import: any room.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from causalscan import files
from causalscan.cli import audit, circuit, direction, elicit, graph, patch, report, sae, scan, steer, tasks, trace, zoo
from causalscan.errors import RANGES, InputError, check_options
from causalscan.report import write as write_report

COMMANDS = (
    patch,
    scan,
    circuit,
    trace,
    elicit,
    audit,
    direction,
    steer,
    sae,
    graph,
    tasks,
    report,
    zoo,
)  # in the help's order


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="causalscan", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for cmd in COMMANDS:
        cmd.add(sub)
    return p


def _partial(args) -> str:
    """Where an interrupted command left its work, in words (its result class says whether it resumes)."""
    resumes = args.result is not None and args.result.resumes(vars(args))
    if not getattr(args, "out", None):
        return "nothing was saved" + (" (with --out, it keeps its partial work and resumes)" if resumes else "")
    if resumes:
        return f"partial results are in {args.out}; the same command resumes from them"
    return f"nothing was written to {args.out}; the command starts over when rerun"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out = getattr(args, "out", None)
    try:
        # every numeric option in range, and --out writable, before any file is read or model loaded
        check_options(**{k: v for k, v in vars(args).items() if k in RANGES})
        if out and args.command == "tasks":
            files.out_file(out)
        elif out:
            files.out_dir(out)
        if getattr(args, "report", False) and not out:
            raise InputError("--report writes report.html into --out: give --out", field="report")
        with files.lock(out) if out and args.command != "tasks" else contextlib.nullcontext():
            doc = args.fn(args)
            if getattr(args, "report", False):
                doc["report"] = str(write_report(out))
                print(f"report: {doc['report']}", file=sys.stderr)
    except InputError as e:
        print(f"causalscan: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if getattr(args, "bars", None):
            args.bars.close()  # ends the bar's line, so the note is a line of its own
        print(f"causalscan: interrupted; {_partial(args)}", file=sys.stderr)
        return 130
    except Exception as e:  # internal failure: keep the traceback for the report
        import traceback

        traceback.print_exc()
        print(f"causalscan: internal error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(files.strict_json(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
