"""Engine files that would kill their runtime: a `.pte` of random bytes whose sha256 matches
the manifest is refused in one line by `edge-agent check`, skipped by `edge-agent run` (which
runs another proven engine) and never signed by `edge-deploy sign`; a runtime that aborts
the process that loads a file is met in a child process, and named."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from agent.first_load import child_failure
from agent.signing import SIGNATURE_FILE
from tests.support import Agent, copy_bundle, run_cli
from tests.support.broker import Broker, Subscriber

pytestmark = pytest.mark.e2e

PTE = "quantized_cnn.pte"


def with_random_pte(bundle: Path, tmp_path: Path, seed: int, header: bytes = b"") -> Path:
    """A copy of `bundle` whose ExecuTorch file is random bytes, its manifest saying so."""
    b = copy_bundle(bundle, tmp_path / f"b{seed}")
    rng = random.Random(seed)
    data = header + bytes(rng.getrandbits(8) for _ in range(20_000))
    (b / PTE).write_bytes(data)
    m = json.loads((b / "manifest.json").read_text())
    m["files"][PTE] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (b / "manifest.json").write_text(json.dumps(m))
    return b


@pytest.mark.parametrize("seed, header", [(1, b""), (3, b""), (5, b"\x3c\0\0\0ET12")])
def test_check_refuses_a_random_pte_with_a_matching_hash_in_one_line(
        bundle: Path, tmp_path: Path, seed: int, header: bytes) -> None:
    """Before: the runtime aborted the process (exit 134) with no output at all."""
    b = with_random_pte(bundle, tmp_path, seed, header)
    proc = run_cli("agent", "check", "--set", f"model.dir={b}", "--set",
                   "model.engine=executorch")
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("BundleError:"), proc.stderr
    assert PTE in lines[0] and ("ExecuTorch program" in lines[0] or "flatbuffer" in lines[0])
    auto = run_cli("agent", "check", "--set", f"model.dir={b}")  # the others still run
    assert auto.returncode == 0, auto.stderr
    assert "executorch" in auto.stdout and "failed" in auto.stdout


def test_sign_refuses_a_bundle_whose_pte_does_not_load(bundle: Path, tmp_path: Path,
                                                       fleet_key: Path) -> None:
    b = with_random_pte(bundle, tmp_path, 1)
    proc = run_cli("deploy.cli", "sign", b, "--key", fleet_key)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert PTE in proc.stderr and not (b / SIGNATURE_FILE).exists()


def test_run_skips_the_bad_file_and_serves_with_another_engine(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    b = with_random_pte(bundle, tmp_path, 3)
    sub = Subscriber(broker.port)
    agent = Agent(b, broker.port, tmp_path, duration=3)
    assert agent.wait(120) == 0, agent.output()
    sub.close()
    assert sub.telemetry() and "Traceback" not in agent.output()
    assert {m.get("engine") for m in sub.telemetry()} <= {"torchscript", "onnxruntime"}


def test_a_runtime_that_aborts_its_process_is_named_with_its_own_log_line(
        tmp_path: Path) -> None:
    """The runtime itself, given random bytes without the header check: it aborts the
    process; the parent's error is one line with the signal and the runtime's words."""
    code = ("import random, torch\n"
            "from agent.engines.executorch import bindings\n"
            "lib = bindings()\n"
            # the identifier's bytes go into the runtime's error message, which is not
            # UTF-8: the bindings throw while throwing, and the process aborts
            "data = bytes(random.Random(2).getrandbits(8) for _ in range(64))\n"
            "lib._load_program_from_buffer(data).load_method('forward')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          errors="replace", timeout=120)
    if proc.returncode >= 0:
        pytest.skip(f"this runtime release refuses these bytes itself (exit {proc.returncode})")
    err = child_failure(proc, tmp_path, "executorch")
    assert "SIGABRT" in str(err) and "\n" not in str(err)
    assert "the runtime said:" in str(err)
