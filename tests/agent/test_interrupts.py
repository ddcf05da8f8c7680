"""Ctrl-C before the agent's own handlers: the exit code a CLI promises, never a signal death."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.e2e


def run(code: str, *, module_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`code` in a fresh Python: by `-c`, or as `python -m` of a module in `module_dir` (the
    way `python -m agent` runs, where CPython's exit path differs)."""
    code = textwrap.dedent(code)
    if module_dir is None:
        args = ["-c", code]
    else:
        (module_dir / "interrupted_module.py").write_text(code)
        args = ["-m", "interrupted_module"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        str(p) for p in (module_dir, ROOT) if p is not None)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=env)


@pytest.mark.parametrize("fixed", [True, False])
def test_a_ctrl_c_caught_inside_exec_code_still_exits_with_the_programs_code(
        tmp_path: Path, fixed: bool) -> None:
    """A KeyboardInterrupt raised in code built by exec (as dataclasses and namedtuple build
    theirs during any import) and caught by `python -m`'s module ends the process with the
    module's exit code through `interrupted()`; without it, CPython 3.11 dies by SIGINT."""
    if not fixed and sys.version_info[:2] != (3, 11):
        pytest.skip("the control: CPython 3.11's signal death, which interrupted() prevents")
    r = run(f"""
        import os, signal, time
        from agent.interrupts import interrupted
        try:
            exec("import os, signal, time; os.kill(os.getpid(), signal.SIGINT); time.sleep(5)")
        except KeyboardInterrupt:
            raise SystemExit({"interrupted()" if fixed else "130"})
    """, module_dir=tmp_path)
    assert r.returncode == (130 if fixed else -signal.SIGINT), (r.returncode, r.stderr)


def test_a_ctrl_c_held_during_a_native_import_is_raised_when_the_block_ends() -> None:
    """Inside `ctrl_c_held` the block runs to its end; the Ctrl-C comes after it, once, and
    Python's own handler is back."""
    r = run("""
        import os, signal, time
        from agent.interrupts import ctrl_c_held
        try:
            with ctrl_c_held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
                print("block finished")
        except KeyboardInterrupt:
            print("raised after the block")
        print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:3] == ["block finished", "raised after the block", "True"]


def test_ctrl_c_held_leaves_a_handler_the_program_installed_alone() -> None:
    """The running agent's own SIGINT handler stays in charge inside the block."""
    r = run("""
        import os, signal, time
        from agent.interrupts import ctrl_c_held
        seen = []
        signal.signal(signal.SIGINT, lambda s, f: seen.append(s))
        with ctrl_c_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
        print(len(seen), signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1 False"
