"""Just-in-time build of the C++/CUDA kernels in ``prograd_fast.csrc`` (ninja, cached), and
of the optimizer's small host helper (kind ``"host"``, see :mod:`prograd_fast._host`).

Each extension is compiled at most once per process, on first use, under a lock, with
``torch.utils.cpp_extension.load``; torch caches the build per machine (its default
extensions directory, or ``PROGRAD_FAST_BUILD_DIR``) and rebuilds only when a source
changes.  When a compiler, ninja or nvcc is missing or the build fails, :func:`load`
raises :class:`ExtensionUnavailable` and :func:`unavailable_reason` returns a one-line
reason; the backends turn that into ``available()`` (auto then uses torch).
``PROGRAD_FAST_NO_BUILD=1`` disables building (the backends report that as the reason).

Every extension builds in its own directory (``PROGRAD_FAST_BUILD_DIR/<name>``): torch
releases before 2.14 guard a build directory with a ``lock`` file whose mere existence
blocks (``FileBaton``), so extensions built in parallel into one directory wait for each
other's lock and then load a module that was never built, and a build killed mid-way
leaves a ``lock`` that makes every later load wait forever.  With such a torch, a ``lock``
older than ``PROGRAD_FAST_BUILD_LOCK_STALE_S`` seconds (default 600, longer than any build)
is removed with a warning; a younger one is waited for until it is that old.
``PROGRAD_FAST_PREBUILT=1`` loads only extensions an earlier step built and never compiles
(the device check sets it after its build step, so no timed step pays for a build).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from types import ModuleType

__all__ = [
    "BUILD_DIR_ENV",
    "LOCK_STALE_ENV",
    "NO_BUILD_ENV",
    "PREBUILT_ENV",
    "ExtensionUnavailable",
    "build_directory",
    "extension_name",
    "csrc_dir",
    "cuda_build_flags",
    "cuda_compile_command",
    "load",
    "unavailable_reason",
]

BUILD_DIR_ENV = "PROGRAD_FAST_BUILD_DIR"
NO_BUILD_ENV = "PROGRAD_FAST_NO_BUILD"
PREBUILT_ENV = "PROGRAD_FAST_PREBUILT"
LOCK_STALE_ENV = "PROGRAD_FAST_BUILD_LOCK_STALE_S"
DEFAULT_LOCK_STALE_S = 600.0

# CPU capability -> (compiler flags, ATen's CPU_CAPABILITY macros).  The capability is part of
# the extension name, so a cache directory shared between machines never mixes them.
_CPU_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}


class ExtensionUnavailable(RuntimeError):
    """The extension cannot be built or loaded here; the message says why."""


_log = logging.getLogger("prograd_fast")
_lock = threading.Lock()
_modules: dict[str, ModuleType] = {}
_errors: dict[str, str] = {}


def csrc_dir() -> Path:
    """The directory holding the C++/CUDA sources (the installed ``prograd_fast.csrc``)."""
    import prograd_fast.csrc as csrc

    return Path(csrc.__file__).resolve().parent


def _cpu_capability() -> str:
    import torch

    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        cap = "DEFAULT"
    return cap if cap in _CPU_FLAGS else "DEFAULT"


def cuda_build_flags() -> list[str]:
    """nvcc flags: sm_90 (H200) and sm_80 code plus compute_90 PTX for newer GPUs."""
    archs = os.environ.get("PROGRAD_FAST_CUDA_ARCHS", "80;90").split(";")
    flags = ["-O3", "-lineinfo", "--threads", "0"]  # --threads: the archs compile in parallel
    for arch in archs:
        arch = arch.strip()
        if arch:
            flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    top = max(int(a) for a in archs if a.strip())
    flags.append(f"-gencode=arch=compute_{top},code=compute_{top}")
    return flags


def _quiet_import_cpp_extension():
    """Import torch.utils.cpp_extension without its import-time CUDA_HOME warning."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def cuda_include_dirs() -> list[str]:
    """The CUDA toolkit include directory (the one holding cuda_runtime.h), if found.

    torch infers CUDA_HOME from the nvcc on PATH; when that is e.g. /usr/local (nvcc linked
    into /usr/local/bin) the headers live elsewhere, so look in the usual places too."""
    cpp_extension = _quiet_import_cpp_extension()
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME,
             "/usr/local/cuda"]
    for root in roots:
        if not root:
            continue
        for sub in ("include", "targets/x86_64-linux/include", "targets/sbsa-linux/include"):
            inc = Path(root) / sub
            if (inc / "cuda_runtime.h").exists():
                return [str(inc)]
    return []


def cuda_library_dirs() -> list[str]:
    """The CUDA toolkit library directory holding libcudart.so, next to the headers found."""
    out = []
    for inc in cuda_include_dirs():
        root = Path(inc).parent
        for sub in ("lib64", "lib"):
            if (root / sub / "libcudart.so").exists():
                out.append(str(root / sub))
                break
    return out


def cuda_compile_command(output: str, archs: str | None = None) -> list[str]:
    """The nvcc command that compiles ``prograd_cuda.cu`` to an object file with torch's
    include paths and the flags the JIT build uses (a CI compile check without a GPU)."""
    import sysconfig

    cpp_extension = _quiet_import_cpp_extension()
    nvcc = str(Path(cpp_extension.CUDA_HOME or "/usr/local/cuda") / "bin" / "nvcc")
    includes = [f"-I{p}" for p in cpp_extension.include_paths(device_type="cuda")]
    includes += [f"-I{p}" for p in cuda_include_dirs()]
    includes.append(f"-I{sysconfig.get_paths()['include']}")
    if archs is not None:
        os.environ["PROGRAD_FAST_CUDA_ARCHS"], saved = archs, os.environ.get("PROGRAD_FAST_CUDA_ARCHS")
    try:
        flags = cuda_build_flags()
    finally:
        if archs is not None:
            if saved is None:
                os.environ.pop("PROGRAD_FAST_CUDA_ARCHS", None)
            else:
                os.environ["PROGRAD_FAST_CUDA_ARCHS"] = saved
    return [nvcc, "-c", str(csrc_dir() / "prograd_cuda.cu"), "-o", output, *includes,
            *cpp_extension.COMMON_NVCC_FLAGS, "-std=c++20", "--compiler-options", "-fPIC",
            "-DTORCH_EXTENSION_NAME=prograd_cuda_check", *flags]


def _prerequisites(kind: str) -> str | None:
    if os.environ.get(NO_BUILD_ENV, "").strip() not in ("", "0"):
        return f"building C++ extensions is disabled ({NO_BUILD_ENV} is set)"
    try:
        cpp_extension = _quiet_import_cpp_extension()
    except Exception as exc:  # pragma: no cover - torch without cpp_extension
        return f"torch.utils.cpp_extension is unavailable: {exc}"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler found ({cxx!r} is not on PATH)"
    if kind == "cuda":
        import torch

        if torch.version.cuda is None:
            return "this torch build has no CUDA support"
        if cpp_extension.CUDA_HOME is None or not (Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc").exists():
            return "nvcc not found (set CUDA_HOME to a CUDA toolkit)"
    if os.environ.get(PREBUILT_ENV, "").strip() not in ("", "0"):
        directory = build_directory(kind)
        if _built_module(kind, directory) is None:
            return (f"not built by an earlier step ({PREBUILT_ENV} is set, so nothing is "
                    f"compiled now; looked in {directory})")
    return None


def extension_name(kind: str) -> str:
    """The module name torch builds for ``kind``: it names the CPU capability and the CUDA
    major version, so one cache directory shared between machines never mixes builds."""
    if kind == "host":
        return "prograd_fast_host"
    if kind == "cpu":
        return f"prograd_fast_cpu_{_cpu_capability().lower()}"
    import torch

    major = torch.version.cuda.split(".")[0] if torch.version.cuda else "x"
    return f"prograd_fast_cuda_cu{major}"


def build_directory(kind: str) -> Path:
    """Where ``kind`` is built: ``PROGRAD_FAST_BUILD_DIR/<name>``, else torch's default
    per-extension directory.  Never shared between extensions (see the module docstring)."""
    name = extension_name(kind)
    base = os.environ.get(BUILD_DIR_ENV)
    if base:
        return Path(base) / name
    cpp_extension = _quiet_import_cpp_extension()
    return Path(cpp_extension._get_build_directory(name, verbose=False))


def _torch_lock_is_a_file_baton() -> bool:
    """Whether this torch's JIT build lock is a ``FileBaton`` (its ``lock`` file's existence
    blocks) rather than an OS lock released when its holder dies (torch >= 2.14)."""
    return hasattr(_quiet_import_cpp_extension(), "FileBaton")


def _lock_stale_seconds() -> float:
    text = os.environ.get(LOCK_STALE_ENV, "").strip()
    try:
        return float(text) if text else DEFAULT_LOCK_STALE_S
    except ValueError:
        raise ExtensionUnavailable(
            f"{LOCK_STALE_ENV} must be a number of seconds, got {text!r}") from None


def _clear_stale_lock(directory: Path, stale_after_s: float, poll_s: float = 0.5) -> None:
    """Wait while another process's ``lock`` in ``directory`` is younger than
    ``stale_after_s``; remove it, with a warning, once it is older (its builder is dead)."""
    lock = directory / "lock"
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age >= stale_after_s:
            break
        time.sleep(min(poll_s, stale_after_s - age + 0.01))
    try:
        lock.unlink()
    except FileNotFoundError:
        return
    _log.warning("removed the stale build lock %s (%.0f s old, more than %s=%g s: a build "
                 "was killed before it finished); building again", lock, age, LOCK_STALE_ENV,
                 stale_after_s)


def _built_module(kind: str, directory: Path) -> Path | None:
    found = sorted(directory.glob(f"{extension_name(kind)}*.so"))
    return found[0] if found else None


def _build(kind: str) -> ModuleType:
    cpp_extension = _quiet_import_cpp_extension()
    src = csrc_dir()
    name = extension_name(kind)
    directory = build_directory(kind)
    directory.mkdir(parents=True, exist_ok=True)
    if _torch_lock_is_a_file_baton():
        _clear_stale_lock(directory, _lock_stale_seconds())
    build_dir = str(directory)
    if kind == "host":  # the optimizer's host path (_host.py): no kernels, builds quickly
        return cpp_extension.load(name=name, sources=[str(src / "prograd_host.cpp")],
                                  extra_cflags=["-O2"], build_directory=build_dir, verbose=False)
    if kind == "cpu":
        cflags = ["-O3", "-fopenmp", *_CPU_FLAGS.get(_cpu_capability(), [])]
        return cpp_extension.load(name=name, sources=[str(src / "prograd_cpu.cpp")],
                                  extra_cflags=cflags, extra_ldflags=["-fopenmp"],
                                  build_directory=build_dir, verbose=False)
    return cpp_extension.load(name=name, sources=[str(src / "prograd_cuda.cu"),
                                                  str(src / "prograd_cuda_bind.cpp")],
                              extra_include_paths=cuda_include_dirs(),
                              extra_ldflags=[f"-L{d}" for d in cuda_library_dirs()],
                              extra_cflags=["-O3"], extra_cuda_cflags=cuda_build_flags(),
                              build_directory=build_dir, verbose=False)


def load(kind: str) -> ModuleType:
    """The compiled module for ``kind`` ("cpu", "cuda" or "host"); builds it on first use."""
    if kind not in ("cpu", "cuda", "host"):
        raise ValueError(f"kind must be 'cpu', 'cuda' or 'host', got {kind!r}")
    module = _modules.get(kind)
    if module is not None:
        return module
    with _lock:
        if kind in _modules:
            return _modules[kind]
        if kind in _errors:
            raise ExtensionUnavailable(_errors[kind])
        reason = _prerequisites(kind)
        if reason is None:
            _log.info("loading the prograd_fast %s extension (compiled on first use, then cached)", kind)
            try:
                _modules[kind] = _build(kind)
            except Exception as exc:
                text = " ".join(str(exc).split())
                if len(text) > 1200:  # the command lines come first, the error last
                    text = text[:300] + " ... " + text[-900:]
                reason = f"building the {kind} extension failed: {text}"
        if reason is not None:
            _errors[kind] = reason
            raise ExtensionUnavailable(reason)
        return _modules[kind]


def unavailable_reason(kind: str) -> str | None:
    """``None`` when the extension loads (building it if needed), else why it cannot."""
    try:
        load(kind)
    except ExtensionUnavailable as exc:
        return str(exc)
    return None
