"""Command line: ``modtimeline demo | summary | diff``.

User mistakes (a bad path, a damaged trace) end with one line on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .analysis.commands import EXIT_ERROR, EXIT_OK, add_analysis_commands, emit, int_at_least, split_candidates
from .errors import DeviceError, ModTimelineError


def _demo(args: argparse.Namespace) -> int:
    import torch  # only the demo needs torch

    from .demo import run_demo

    if args.device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but CUDA is not available on this machine")

    path = run_demo(args.output, steps=args.steps, device=args.device)
    size = path.stat().st_size
    emit(f"wrote {path} ({size / 1024:.0f} KiB): {args.steps} training steps of a small transformer\n"
         "open it: drag the file onto https://ui.perfetto.dev (or `modtimeline summary "
         f"{path}` for a per-module table)")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modtimeline", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a small built-in transformer under a Timeline")
    demo.add_argument("-o", "--output", default="modtimeline-demo.json", help="trace file to write")
    demo.add_argument("--steps", type=int_at_least(1), default=4)
    demo.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    demo.set_defaults(run=_demo)

    add_analysis_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(split_candidates(list(sys.argv[1:] if argv is None else argv)))
    try:
        return int(args.run(args))
    except ModTimelineError as error:
        print(f"modtimeline: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("modtimeline: interrupted", file=sys.stderr)
        return EXIT_ERROR
