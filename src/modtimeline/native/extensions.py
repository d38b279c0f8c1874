"""The compiled parts and how they are built: one definition for ``setup.py`` (at install)
and ``modtimeline build`` (after it, for the torch installed now). Imports setuptools and
torch only when asked for the extensions."""

from __future__ import annotations

import contextlib
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any

# The event layout both C++ parts include (the C++ copy of buffer.py's constants).
LAYOUT_HEADER = "native/_layout.h"
# What both compiled writers share (an output buffer, column views).
WRITERS_HEADER = "writers/_columns.h"
# How the hot path hands events to the compiled device marks.
DEVICE_MARKS_HEADER = "native/_device_marks.h"


def extensions(package_dir: str | Path, prefix: str = "") -> list[Any]:
    """setuptools ``Extension``s of every compiled part whose needs are met here; sources
    under ``package_dir`` (given to setuptools as ``prefix`` + the file's path in the
    package). The hot path needs torch's headers: without torch it is left out."""
    from setuptools import Extension

    def source(name: str) -> str:
        return f"{prefix}{name}"

    header = source(LAYOUT_HEADER)
    parts = [
        Extension("modtimeline.writers._chrome_rows", [source("writers/_chrome_rows.c")],
                  depends=[source(WRITERS_HEADER), header], optional=True),
        Extension("modtimeline.writers._pftrace_rows", [source("writers/_pftrace_rows.c")],
                  depends=[source(WRITERS_HEADER), header], optional=True),
        Extension("modtimeline.native._resolve_cpu", [source("native/_resolve_cpu.cpp")], depends=[header], language="c++",
                  extra_compile_args=["-std=c++17", "-O2"], optional=True),
    ]
    try:
        torch, CppExtension, library_paths = _torch_for_the_build()
    except ImportError:
        return parts
    # torch's own definition (its headers, libraries and language); the C++ standard, the
    # ABI macro and the run path are ours, as torch's BuildExtension would set them.
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))

    def against_torch(name: str, link_args: list[str], run_paths: list[str]) -> Any:
        return CppExtension(
            f"modtimeline.native.{name}",
            [source(f"native/{name}.cpp")],
            depends=[header, source(DEVICE_MARKS_HEADER)],
            extra_compile_args=["-std=c++20", "-O2", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-fvisibility=hidden",
                                "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
            extra_link_args=link_args + [f"-Wl,-rpath,{path}" for path in [*library_paths(), *run_paths]],
            optional=True,
        )

    parts.append(against_torch("_hotpath", [], []))
    runtime = _cuda_runtime(torch)
    if runtime is not None:
        # The device marks in C++: against torch's device interface and the CUDA runtime
        # torch itself loads (the same file: one runtime in the process).
        parts.append(against_torch("_cuda_marks", [f"-L{runtime.parent}", f"-l:{runtime.name}"], [str(runtime.parent)]))
    return parts


def _cuda_runtime(torch: Any) -> Path | None:
    """The CUDA runtime library a CUDA build of torch loads: from the nvidia-* wheels beside
    torch (pip's CUDA torch brings them), CUDA_HOME / CUDA_PATH, or /usr/local/cuda; of the
    major version torch was built for. None for a CPU torch or where none is found."""
    if not getattr(torch.version, "cuda", None):
        return None
    roots = []
    wheels = Path(torch.__file__).resolve().parent.parent / "nvidia"
    with contextlib.suppress(OSError):
        roots += sorted(path for path in wheels.iterdir() if path.is_dir())
    roots += [Path(os.environ[name]) for name in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(name)]
    roots.append(Path("/usr/local/cuda"))
    name = f"libcudart.so.{str(torch.version.cuda).split('.')[0]}"
    for root in roots:
        for folder in (root / "lib", root / "lib64"):
            with contextlib.suppress(OSError):  # (a folder we may not read: not this one)
                if (folder / name).is_file():
                    return folder / name
    return None


def _torch_for_the_build() -> tuple[Any, Any, Any]:
    """torch, and its ``CppExtension`` and ``library_paths``: the torch this interpreter
    imports, else the torch of the environment being installed into. A plain ``pip
    install`` builds in an isolated environment without torch, but in a subprocess of the
    target environment's interpreter, whose site-packages still say where its torch is:
    the hot path is built against that torch, the one it will run with. Raises ImportError
    where there is none."""
    try:
        import torch
    except ImportError:
        # Searched after the build environment's own packages (setuptools stays theirs).
        targets = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
        for folder in sorted(targets):
            if (Path(folder) / "torch" / "__init__.py").is_file() and folder not in sys.path:
                sys.path.append(folder)
        import torch
    from torch.utils.cpp_extension import CppExtension, library_paths

    return torch, CppExtension, library_paths
