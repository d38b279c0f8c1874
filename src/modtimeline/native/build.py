"""``modtimeline build``: compile the optional parts for the torch and Python installed now,
into ``loader.cache_dir()``, where they are found when the install has none that
import (modtimeline installed before torch, or a torch upgraded since).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .extensions import extensions
from .loader import cache_dir
from ..errors import ModTimelineError

# Parts whose failure does not stop the build: the GPU marks in C++ need torch's CUDA parts
# and runtime as this machine has them.
OPTIONAL_HERE = frozenset({"modtimeline.native._cuda_marks"})


def build(say: Callable[[str], None]) -> list[Path]:
    """Build every part whose needs are met; the files written."""
    try:
        from setuptools.dist import Distribution
    except ImportError:
        raise ModTimelineError("building needs setuptools: pip install setuptools") from None
    package = Path(__file__).parents[1]
    missing = [name for name in ("native/_hotpath.cpp", "native/_layout.h", "writers/_columns.h")
               if not (package / name).exists()]
    if missing:
        raise ModTimelineError(f"this install of modtimeline has no sources to build from ({', '.join(missing)}); "
                               "reinstall it")
    parts = extensions(package, prefix=f"{package}/")
    if not any(part.name == "modtimeline.native._hotpath" for part in parts):
        raise ModTimelineError("torch is not importable here: the hot path is built against the installed torch")
    target = cache_dir()
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as work:
        for part in parts:
            part.optional = False  # a failure says why
            say(f"building {part.name} ...")
            distribution = Distribution({"name": "modtimeline-build", "ext_modules": [part]})
            command = distribution.get_command_obj("build_ext")
            command.build_lib = str(Path(work) / "lib")
            command.build_temp = str(Path(work) / "temp")
            try:
                distribution.run_command("build_ext")
            except Exception as error:  # setuptools' CompileError, LinkError, a missing compiler
                if part.name in OPTIONAL_HERE:  # (the others, built, still are installed)
                    say(f"could not build {part.name} ({error}): left out, its Python twin does its work")
                    continue
                raise ModTimelineError(f"could not build {part.name}: {error}. A C++ compiler is needed "
                                       "(Debian/Ubuntu: apt-get install g++)") from None
        built = Path(work) / "lib" / "modtimeline"
        for file in sorted(built.rglob("*.so")):
            destination = target / file.relative_to(built)
            destination.parent.mkdir(parents=True, exist_ok=True)
            temporary = destination.with_name(destination.name + ".tmp")
            shutil.copyfile(file, temporary)
            temporary.replace(destination)  # (a running process keeps the file it loaded)
            written.append(destination)
    return written
