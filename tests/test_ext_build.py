"""How the C++/CUDA extensions are built (``prograd_fast._ext``), without a GPU: each in its
own directory, a stale build lock removed with a message, and ``PROGRAD_FAST_PREBUILT``
refusing to compile.  torch releases before 2.14 lock a build directory with a ``lock`` file
whose existence blocks; the stub tests below take that path whatever torch is installed."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
import types

import pytest

from prograd_fast import _ext


@pytest.fixture
def build_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(_ext.BUILD_DIR_ENV, str(tmp_path / "build"))
    monkeypatch.delenv(_ext.PREBUILT_ENV, raising=False)
    monkeypatch.delenv(_ext.NO_BUILD_ENV, raising=False)
    return tmp_path / "build"


@pytest.fixture
def fake_load(monkeypatch):
    """Replace torch's cpp_extension.load: record its arguments and the lock's presence."""
    calls = []
    cpp_extension = _ext._quiet_import_cpp_extension()

    def load(name, sources, build_directory=None, **kwargs):
        calls.append(dict(name=name, build_directory=build_directory,
                          lock_present=os.path.exists(os.path.join(build_directory, "lock"))))
        return types.ModuleType(name)

    monkeypatch.setattr(cpp_extension, "load", load)
    return calls


def test_each_extension_builds_in_its_own_directory(build_dir, fake_load):
    for kind in ("cpu", "cuda", "host"):
        _ext._build(kind)
    dirs = [call["build_directory"] for call in fake_load]
    assert len(set(dirs)) == 3, dirs
    for call in fake_load:
        assert os.path.dirname(call["build_directory"]) == str(build_dir)
        assert os.path.basename(call["build_directory"]) == call["name"]
        assert os.path.isdir(call["build_directory"])


def _lock(directory, age_s):
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / "lock"
    lock.write_text("")
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_a_stale_lock_is_removed_with_a_message(build_dir, fake_load, monkeypatch, caplog):
    monkeypatch.setattr(_ext, "_torch_lock_is_a_file_baton", lambda: True)
    monkeypatch.setenv(_ext.LOCK_STALE_ENV, "30")
    lock = _lock(_ext.build_directory("host"), age_s=120)
    with caplog.at_level(logging.WARNING, logger="prograd_fast"):
        _ext._build("host")
    assert not lock.exists()
    assert fake_load[0]["lock_present"] is False  # torch's load no longer waits on it
    assert any("removed the stale build lock" in r.getMessage() and str(lock) in r.getMessage()
               for r in caplog.records), caplog.text


def test_a_young_lock_is_waited_for_until_it_is_stale(build_dir, fake_load, monkeypatch, caplog):
    monkeypatch.setattr(_ext, "_torch_lock_is_a_file_baton", lambda: True)
    monkeypatch.setenv(_ext.LOCK_STALE_ENV, "1.5")
    lock = _lock(_ext.build_directory("host"), age_s=0)
    with caplog.at_level(logging.WARNING, logger="prograd_fast"):
        _ext._build("host")
    assert not lock.exists() and fake_load[0]["lock_present"] is False
    assert "removed the stale build lock" in caplog.text


def test_a_lock_its_builder_releases_is_left_to_torch(build_dir, fake_load, monkeypatch, caplog):
    monkeypatch.setattr(_ext, "_torch_lock_is_a_file_baton", lambda: True)
    lock = _lock(_ext.build_directory("host"), age_s=0)
    sleeps = []

    def sleep(seconds):  # the other build finishes while we wait
        sleeps.append(seconds)
        lock.unlink()

    monkeypatch.setattr(_ext.time, "sleep", sleep)
    with caplog.at_level(logging.WARNING, logger="prograd_fast"):
        _ext._build("host")
    assert len(sleeps) == 1 and "stale" not in caplog.text


def test_an_os_lock_torch_is_not_touched(build_dir, fake_load, monkeypatch):
    """torch >= 2.14 holds an OS lock on the file, which dies with its holder: leave it."""
    monkeypatch.setattr(_ext, "_torch_lock_is_a_file_baton", lambda: False)
    lock = _lock(_ext.build_directory("host"), age_s=10_000)
    _ext._build("host")
    assert lock.exists()


def test_a_bad_stale_limit_is_a_clear_error(build_dir, monkeypatch):
    monkeypatch.setenv(_ext.LOCK_STALE_ENV, "ten")
    with pytest.raises(_ext.ExtensionUnavailable, match=_ext.LOCK_STALE_ENV):
        _ext._lock_stale_seconds()


def test_prebuilt_loads_only_what_an_earlier_step_built(build_dir, monkeypatch):
    monkeypatch.setenv(_ext.PREBUILT_ENV, "1")
    reason = _ext._prerequisites("host")
    if reason is not None and _ext.PREBUILT_ENV not in reason:
        pytest.skip(f"no toolchain here: {reason}")
    assert _ext.PREBUILT_ENV in reason and "not built" in reason
    directory = _ext.build_directory("host")
    directory.mkdir(parents=True)
    (directory / f"{_ext.extension_name('host')}.so").write_bytes(b"")
    assert _ext._prerequisites("host") is None


@pytest.mark.slow
def test_extensions_built_at_once_into_one_build_dir_all_load(tmp_path):
    """Two processes build two different extensions at the same time (as the device check
    does): each must load its own module.  With a FileBaton torch and one shared directory,
    the second waited on the first's lock, then loaded a module that was never built."""
    reason = _ext._prerequisites("host") or _ext._prerequisites("cpu")
    if reason is not None:
        pytest.skip(f"cannot build here: {reason}")
    code = textwrap.dedent("""
        import sys
        from prograd_fast import _ext
        reason = _ext.unavailable_reason(sys.argv[1])
        print(sys.argv[1], reason or "ok", flush=True)
        sys.exit(reason is not None)
    """)
    env = dict(os.environ, **{_ext.BUILD_DIR_ENV: str(tmp_path / "build")})
    env.pop(_ext.PREBUILT_ENV, None)
    procs = [subprocess.Popen([sys.executable, "-c", code, kind], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for kind in ("host", "cpu")]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
