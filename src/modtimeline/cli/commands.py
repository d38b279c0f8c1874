"""``modtimeline summary`` and ``modtimeline diff``: argument parsing and output."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import orjson

from ..errors import ModTimelineError
from ..analysis.by_rank import DEFAULT_THRESHOLD, DEFAULT_UNEVEN_FLOOR_US, DEFAULT_UNEVEN_THRESHOLD
from ..analysis.diff import REGRESSED, DiffConfig, Rule, diff, load_config
from ..readers.decoding import DEFAULT_LIMITS, ReadLimits
from ..analysis.reader import Trace, distinct_recordings, per_rank, read_trace, trace_files
from ..analysis.render import (
    render_by_rank_markdown,
    render_by_rank_text,
    render_diff_markdown,
    render_diff_text,
    render_summary_markdown,
    render_summary_text,
    use_color,
)
from ..analysis.summary import summarize

EXIT_OK, EXIT_REGRESSION, EXIT_ERROR, EXIT_CANNOT_JUDGE = 0, 1, 2, 3


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def fraction(text: str) -> float:
    """An argparse type: a number between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def non_negative(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def alpha(text: str) -> float:
    """An argparse type: a significance level, above 0 and at most 0.5."""
    value = fraction(text)
    if not 0 < value <= 0.5:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 0.5, got {value}")
    return value


def emit(text: str) -> None:
    """Print to stdout; a reader that went away (``| head``) ends the output quietly."""
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's own flush at exit stays quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _emit_json(document: dict[str, Any]) -> None:
    emit(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())


def _limits(args: argparse.Namespace) -> ReadLimits:
    return ReadLimits(max_bytes=args.max_trace_mb << 20, max_events=args.max_events)


def _read_all(paths: list[str], limits: ReadLimits) -> list[Trace]:
    """Every trace named, a merged one as its ranks; each recording once."""
    traces, notes = distinct_recordings([rank for path in trace_files(paths) for rank in per_rank(read_trace(path, limits))])
    for note in notes:
        print(f"modtimeline: note: {note}", file=sys.stderr)
    return traces


def _summary(args: argparse.Namespace) -> int:
    traces = _read_all(args.traces, _limits(args))
    if args.by_rank:
        from ..analysis.by_rank import by_rank

        view = by_rank(traces, warmup=args.warmup, threshold=args.straggler_threshold, top=args.top,
                       uneven_threshold=args.uneven_threshold, uneven_floor_us=args.uneven_floor_us)
        if args.format == "json":
            _emit_json(view.to_json())
        elif args.format == "markdown":
            emit(render_by_rank_markdown(view))
        else:
            emit(render_by_rank_text(view))
        return EXIT_OK
    summary = summarize(traces, warmup=args.warmup, depth=args.depth, top=args.top, pool_runs=args.pool_runs)
    if args.format == "json":
        _emit_json(summary.to_json())
    elif args.format == "markdown":
        emit(render_summary_markdown(summary, tree=args.top is None))
    else:
        emit(render_summary_text(summary, tree=args.top is None))
    return EXIT_OK


def _diff(args: argparse.Namespace) -> int:
    if args.candidates is not None:
        if not args.candidates:
            raise ModTimelineError("no candidate traces after --: give BASE... -- CANDIDATE...")
        base_paths, candidate_paths = args.traces, args.candidates
    elif len(args.traces) == 2:
        base_paths, candidate_paths = args.traces[:1], args.traces[1:]
    else:
        raise ModTimelineError("give BASE CANDIDATE, or several per side as BASE... -- CANDIDATE...")
    config = DiffConfig()
    if args.config:
        config = load_config(args.config, config)
    if args.threshold is not None or args.floor_us is not None:
        config.default = Rule("*", args.threshold if args.threshold is not None else config.default.threshold,
                              args.floor_us if args.floor_us is not None else config.default.floor_us)
    for name in ("alpha", "correction", "warmup", "min_samples", "max_drift"):
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)
    base = _read_all(base_paths, _limits(args))
    candidate = _read_all(candidate_paths, _limits(args))
    report = diff(base, candidate, config)

    markdown = None
    if args.format == "json":
        _emit_json(report.to_json())
    elif args.format == "markdown":
        markdown = render_diff_markdown(report)
        emit(markdown)
    else:
        emit(render_diff_text(report, show_all=args.all, color=use_color()))
    summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_file:
        try:
            with open(summary_file, "a", encoding="utf-8") as stream:
                stream.write((markdown or render_diff_markdown(report)) + "\n")
        except OSError as error:
            print(f"modtimeline: warning: cannot append to GITHUB_STEP_SUMMARY: {error}", file=sys.stderr)
    if any(m.verdict == REGRESSED for m in report.modules):
        return EXIT_REGRESSION
    # (a gate that could not have failed must not pass)
    return EXIT_CANNOT_JUDGE if report.cannot_judge is not None else EXIT_OK


def _output_not_among(output: str, inputs: list[str]) -> str:
    """The real path of a merge's ``output``, refused if it is one of the ``inputs`` named."""
    real = os.path.realpath(os.path.expanduser(output))
    if any(os.path.realpath(path) == real for path in inputs):
        raise ModTimelineError(f"{output} is one of the traces to merge: write the merge to another file")
    return real


def _merge(args: argparse.Namespace) -> int:
    if args.profiler:
        return _merge_profiler(args)
    from ..analysis.merge import merge

    output = _output_not_among(args.output, args.traces)
    # (a folder's own earlier merge, found in it: replaced, not merged again)
    paths = [path for path in trace_files(args.traces) if os.path.realpath(path) != output]
    if not paths:
        raise ModTimelineError(f"no trace to merge besides {args.output}")
    result = merge(paths, args.output, _limits(args), force=args.force)
    lines = [f"merged {result.files} file(s) of {len(result.ranks)} rank(s) into {result.output}, on rank 0's clock:"]
    for rank in result.ranks:
        offset, error = rank["clock_offset_ns"], rank["clock_error_ns"]
        bound = "error unknown (no clock samples: wall clocks used)" if error is None else f"± {error / 1000:.1f} µs"
        lines.append(f"  rank {rank['rank']} ({rank['hostname']}): offset {offset / 1e6:+.3f} ms {bound}")
    emit("\n".join(lines))
    return EXIT_OK


def _merge_profiler(args: argparse.Namespace) -> int:
    from ..analysis.profiler import merge_profiler

    _output_not_among(args.output, [args.profiler, *args.traces])
    paths = trace_files(args.traces)
    if len(paths) != 1:
        raise ModTimelineError("--profiler merges one trace (the rank that ran under that profiler) into the "
                               f"profiler's trace; got {len(paths)}")
    result = merge_profiler(args.profiler, paths[0], args.output, _limits(args))
    clock = result.clock
    if clock.error_ns is None:
        how = "by wall clock (no clock markers in the profiler's trace: error unknown)"
    else:
        how = f"by {clock.markers} clock markers, within about {clock.error_ns / 1000:.1f} µs"
    kernels = (f"; {result.kernels_attributed:,} of {result.kernels:,} GPU kernels attributed to modules"
               if result.kernels else "")
    emit(f"wrote {result.output}: the profiler's trace with {result.spans:,} module spans, lined up {how}{kernels}")
    return EXIT_OK


def add_analysis_commands(commands: Any) -> None:
    summary = commands.add_parser("summary", help="per-module table of a trace (or several)",
                                  description="Per-module time per step: forward, backward, recompute; total and self.")
    summary.add_argument("traces", nargs="+", help="trace files or directories of them")
    summary.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    summary.add_argument("--top", type=int_at_least(1), help="only the N modules with the most time (a flat list)")
    summary.add_argument("--depth", type=int_at_least(0),
                         help="only modules at most D levels of calls below the root (root = 0; a container that is "
                              "never called, like a ModuleList, is no level)")
    summary.add_argument("--warmup", type=int_at_least(0), default=1,
                         help="leave out the first N marked steps of each trace (default 1, as diff); a trace "
                              "without steps marked is one step, always kept")
    summary.add_argument("--pool-runs", action="store_true",
                         help="average traces of different runs together (refused by default)")
    summary.add_argument("--by-rank", action="store_true",
                         help="the ranks of one run side by side: step time per rank, and per module the slowest "
                              "rank and the spread (rank files or a merged file)")
    summary.add_argument("--straggler-threshold", type=non_negative, default=DEFAULT_THRESHOLD,
                         help="--by-rank flags a rank whose median step is this much above the median "
                              f"(default {DEFAULT_THRESHOLD})")
    summary.add_argument("--uneven-threshold", type=non_negative, default=DEFAULT_UNEVEN_THRESHOLD,
                         help="--by-rank flags a module uneven when its slowest rank is this much above the median "
                              f"over ranks (default {DEFAULT_UNEVEN_THRESHOLD}: below it is scheduling noise) ...")
    summary.add_argument("--uneven-floor-us", type=non_negative, default=DEFAULT_UNEVEN_FLOOR_US,
                         help="... and by more than this many µs per step (default "
                              f"{DEFAULT_UNEVEN_FLOOR_US:g})")
    _add_limits(summary)
    summary.set_defaults(run=_summary)

    compare = commands.add_parser(
        "diff", help="compare base and candidate traces; exit 1 if a module got slower beyond noise",
        description="Per module, phase and device: Mann-Whitney U on per-step times, corrected for testing "
                    "every module, plus a relative threshold and an absolute floor. Exit codes: 0 no "
                    "regression, 1 regression, 2 error, 3 too few steps for any module to reach "
                    "significance (cannot judge). Several traces per side: BASE... -- CANDIDATE... "
                    "(options before the --); a directory stands for the traces in it.")
    compare.add_argument("traces", nargs="+", help="BASE CANDIDATE, or the base traces before --")
    # (after a bare --; "*": none after it is said by _diff, not as an option nobody typed)
    compare.add_argument("--candidates", nargs="*", help=argparse.SUPPRESS)
    output = compare.add_mutually_exclusive_group()
    output.add_argument("--format", choices=("table", "markdown", "json"), default="table")
    output.add_argument("--markdown", dest="format", action="store_const", const="markdown",
                        help="markdown sorted by absolute change, for a PR comment")
    output.add_argument("--json", dest="format", action="store_const", const="json")
    compare.add_argument("--config", help="TOML file with [diff] settings and per-FQN-glob thresholds")
    compare.add_argument("--threshold", type=fraction, help="relative change that counts (default 0.05)")
    compare.add_argument("--floor-us", type=non_negative, help="absolute change per step that counts (default 20)")
    compare.add_argument("--alpha", type=alpha, help="significance level after correction (default 0.05)")
    compare.add_argument("--correction", choices=("holm", "bh"), help="multiple-testing correction (default holm)")
    compare.add_argument("--warmup", type=int_at_least(0), help="marked steps left out at the start of each trace "
                         "(default 1; a trace without steps marked is one step, always kept)")
    compare.add_argument("--min-samples", type=int_at_least(2), help="steps per side needed for a verdict (default 5)")
    compare.add_argument("--max-drift", type=fraction, help="largest common shift of all modules taken for machine "
                         "drift and corrected (default 0.25; 0 turns the correction off)")
    compare.add_argument("--all", action="store_true", help="list unchanged modules too")
    _add_limits(compare)
    compare.set_defaults(run=_diff)

    merging = commands.add_parser(
        "merge", help="merge the rank files of one job into one trace on rank 0's clock",
        description="One process per rank, every time on rank 0's clock (from the clock offsets each rank "
                    "measured against rank 0), call and flow ids unique. Reads one file at a time. With "
                    "--profiler KINETO.json TRACE: the profiler's trace with TRACE's module spans added as threads "
                    "of its process, on its clock, and GPU kernels attributed to the modules that launched them.")
    merging.add_argument("traces", nargs="+", help="rank trace files, or directories of them")
    merging.add_argument("-o", "--output", required=True, help="merged file: .json, .json.gz or .pftrace")
    merging.add_argument("--profiler", metavar="KINETO.json",
                         help="instead: put one trace's module spans into this torch.profiler trace, on its clock "
                              "(output .json or .json.gz)")
    merging.add_argument("--force", action="store_true", help="merge files of different runs (refused by default)")
    _add_limits(merging)
    merging.set_defaults(run=_merge)


def _add_limits(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-trace-mb", type=int_at_least(1), default=DEFAULT_LIMITS.max_bytes >> 20,
                        help=f"largest trace read, after gunzip (default {DEFAULT_LIMITS.max_bytes >> 20} MiB)")
    parser.add_argument("--max-events", type=int_at_least(1), default=DEFAULT_LIMITS.max_events,
                        help=f"most events in one trace (default {DEFAULT_LIMITS.max_events:,})")


def split_candidates(argv: list[str]) -> list[str]:
    """``diff A B -- C D`` -> ``diff A B --candidates C D`` (argparse drops a bare --)."""
    if argv[:1] == ["diff"] and "--" in argv:
        cut = argv.index("--")
        return argv[:cut] + ["--candidates"] + argv[cut + 1:]
    return argv
