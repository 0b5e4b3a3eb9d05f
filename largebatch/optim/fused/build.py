"""The fused kernels (kernels.cpp) compiled at first use into a cache directory, and loaded.

The kernels are plain C++ with OpenMP, built by the system's C++ compiler (``$CXX``, else ``g++``,
else ``c++``) in about a second into a shared library named by a hash of the source, the compiler's
version, the flags and the CPU: a machine compiles each version once, and every later process (and
every later optimizer of this one) only loads it. ``-march=native`` (hence the CPU in the name) and
``-fno-math-errno`` let LAMB's square roots and divisions vectorise to the machine's widest vectors;
without them its step is compute-bound. The library is written under a temporary name and renamed
into place, so processes that build it at the same moment, such as the ranks of a job, never load
half a file. The cache directory is ``$LARGEBATCH_CACHE_DIR/kernels``, by default
``~/.cache/largebatch/kernels``.

The kernels run on torch's own OpenMP threads: the library asks for ``libgomp.so.1``, the runtime
that torch's pip wheels have already loaded under that name, so the process keeps one thread pool.
(A torch built with another OpenMP runtime would leave the kernels a pool of their own.)

A torch C++ extension (``torch.utils.cpp_extension.load_inline``) would run the same loops but
compiles torch's headers, about a minute on two cores; through ctypes the kernels get raw pointers
and sizes, which is all they need.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("kernels.cpp")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fopenmp", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno")
CACHE_ENV = "LARGEBATCH_CACHE_DIR"


class KernelBuildError(RuntimeError):
    """The fused kernels cannot be built here (no C++ compiler, or it failed); says why."""


def cache_dir() -> Path:
    """Where compiled kernels are kept: $LARGEBATCH_CACHE_DIR/kernels, else ~/.cache/largebatch/kernels."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "largebatch") / "kernels"


def compiler() -> str:
    """The C++ compiler to use: $CXX, else g++ or c++ on the PATH; KernelBuildError when there is none."""
    found = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not found:
        raise KernelBuildError("no C++ compiler found: install g++ or set CXX")
    return found


def cpu() -> str:
    """What -march=native compiles for: the CPU's model and feature flags (Linux), else the platform's words."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags", "Features"))}))


def library_path(cxx: str, directory: Path) -> Path:
    """The library in `directory` for this source, compiler (its version), flags and CPU."""
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise KernelBuildError(f"the C++ compiler {cxx!r} does not run: {e}") from e
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, *FLAGS, cpu()]).encode()).hexdigest()[:16]
    return directory / f"largebatch_fused_{key}.so"


def compile_library(cxx: str, target: Path) -> None:
    """Compile kernels.cpp into `target`, atomically (a temporary file in the same directory, renamed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            raise KernelBuildError(f"{cxx} failed to compile {SOURCE}:\n{done.stderr.strip()}")
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would keep the library from other users of a shared cache
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@functools.cache
def load(directory: Path) -> ctypes.CDLL:
    """The kernels' library in `directory` (the cache_dir() of the caller), compiled there first if it
    is not there yet; once per process and directory."""
    cxx = compiler()
    path = library_path(cxx, directory)
    if not path.exists():
        compile_library(cxx, path)
    return declare(ctypes.CDLL(str(path)))


def library() -> ctypes.CDLL:
    """The kernels' library of the current cache directory (see `load`)."""
    import torch  # noqa: F401  (torch's OpenMP runtime first, so that the library shares it)

    return load(cache_dir())


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """`lib` with the argument types of its four entry points (kernels.cpp's extern "C" functions)."""
    ptr, i64, f64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    for suffix in ("f32", "f64"):
        lars = getattr(lib, f"lb_lars_step_{suffix}")
        lars.argtypes = [i64, ptr, ptr, ptr, ptr, f64, f64, f64, f64, f64, i32, i32, i32, i64, i32, ptr]
        lars.restype = None
        lamb = getattr(lib, f"lb_lamb_step_{suffix}")
        lamb.argtypes = [i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, f64, f64, f64, f64, f64, i32, i64, i32, ptr]
        lamb.restype = None
    return lib
