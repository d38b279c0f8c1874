"""``modtimeline build`` on an install without compiled parts (what an isolated ``pip
install`` gives): before, ``info`` says the hot path is not built and how to get it; after,
it is in use from the cache, and a Timeline records through it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SOURCE = Path(__file__).parent.parent / "src" / "modtimeline"


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a C++ compiler")
def test_build_makes_an_install_without_compiled_parts_fast(tmp_path):
    site = tmp_path / "site"
    shutil.copytree(SOURCE, site / "modtimeline", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(site), "MODTIMELINE_CACHE": str(tmp_path / "cache")}
    env.pop("MODTIMELINE_PURE_PYTHON", None)

    before = _run(env, "-m", "modtimeline", "info")
    assert before.returncode == 0, before.stderr
    assert "_hotpath: not in use: not built" in before.stdout
    warned = _run(env, "-W", "error::RuntimeWarning", "-c", "import modtimeline; modtimeline.Timeline('x.json')")
    assert "modtimeline build" in warned.stderr  # the warning says how to get it

    built = _run(env, "-m", "modtimeline", "build")
    assert built.returncode == 0, built.stderr + built.stdout
    assert "_hotpath" in built.stdout

    after = _run(env, "-m", "modtimeline", "info")
    for part in ("native._hotpath", "native._resolve_cpu", "writers._chrome_rows", "writers._pftrace_rows"):
        assert f"{part}: in use (built by `modtimeline build`" in after.stdout, after.stdout
    recorded = _run(env, "-c", "import torch, modtimeline\n"
                    f"tl = modtimeline.Timeline({str(tmp_path / 't.json')!r})\n"
                    "print(type(tl.buffer).__name__)\n"
                    "with tl:\n    torch.nn.Linear(2, 2)(torch.randn(1, 2)).sum().backward()\n")
    assert recorded.returncode == 0, recorded.stderr
    assert recorded.stdout.strip() == "NativeEventBuffer"
    assert (tmp_path / "t.json").stat().st_size > 0


_ISOLATED_BUILD = """
import importlib.util, sys, sysconfig
site = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
sys.path[:] = [path for path in sys.path if path not in site] + [sys.argv[2]]  # as pip's isolation leaves it
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("torch is still importable: not isolated")
spec = importlib.util.spec_from_file_location("_extension", sys.argv[1] + "/native/extensions.py")
extension = importlib.util.module_from_spec(spec)
spec.loader.exec_module(extension)
print(" ".join(part.name for part in extension.extensions(sys.argv[1])))
"""


def test_an_isolated_build_finds_the_torch_it_installs_beside(tmp_path):
    """A plain ``pip install`` builds in an environment of its own, without torch, run by
    the target environment's interpreter: the hot path is still defined, against the
    target's torch (the one it will run with)."""
    import setuptools
    import sysconfig

    overlay = tmp_path / "overlay"  # the build environment: setuptools only
    overlay.mkdir()
    (overlay / "setuptools").symlink_to(Path(setuptools.__file__).parent)
    site = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    if not any((Path(folder) / "torch").is_dir() for folder in site):
        pytest.skip("torch is not installed in this interpreter's site-packages")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    built = _run(env, "-c", _ISOLATED_BUILD, str(SOURCE), str(overlay))
    assert built.returncode == 0, built.stderr
    assert "modtimeline.native._hotpath" in built.stdout.split(), built.stdout
