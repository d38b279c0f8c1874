"""Only the optional compiled parts live here; everything else is in pyproject.toml.

* ``modtimeline.writers._chrome_rows`` (C) formats Chrome trace rows ~10x faster.
* ``modtimeline.writers._pftrace_rows`` (C) encodes the .pftrace span packets.
* ``modtimeline._resolve_cpu`` (C++, no torch) pairs host-only events into spans.
* ``modtimeline._hotpath`` (C++ against torch's headers) is the Recorder's hot path:
  forward hooks and C++ autograd node pre-hooks. It needs torch at build time, so it is
  built only when torch is importable (``pip install --no-build-isolation``, as
  tools/setup.sh does) and matches that torch's ABI.

Both are optional: where one cannot be built, the install goes on without it and the
pure-Python code does the same work, slower.
"""

from setuptools import Extension, setup


# The event layout both C++ parts include (the C++ copy of buffer.py's constants).
LAYOUT_HEADER = "src/modtimeline/_layout.h"


def hotpath_extension() -> list[Extension]:
    try:
        import torch
        from torch.utils.cpp_extension import include_paths, library_paths
    except ImportError:
        return []
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    return [
        Extension(
            "modtimeline._hotpath",
            ["src/modtimeline/_hotpath.cpp"],
            depends=[LAYOUT_HEADER],
            include_dirs=include_paths(),
            library_dirs=library_paths(),
            libraries=["c10", "torch", "torch_cpu", "torch_python"],
            extra_compile_args=["-std=c++20", "-O2", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-fvisibility=hidden",
                                "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
            extra_link_args=[f"-Wl,-rpath,{path}" for path in library_paths()],
            language="c++",
            optional=True,
        )
    ]


setup(
    ext_modules=[
        Extension("modtimeline.writers._chrome_rows", ["src/modtimeline/writers/_chrome_rows.c"], optional=True),
        Extension("modtimeline.writers._pftrace_rows", ["src/modtimeline/writers/_pftrace_rows.c"], optional=True),
        Extension("modtimeline._resolve_cpu", ["src/modtimeline/_resolve_cpu.cpp"], depends=[LAYOUT_HEADER], language="c++",
                  extra_compile_args=["-std=c++17", "-O2"], optional=True),
        *hotpath_extension(),
    ]
)
