"""edge-agent check: the board refuses any bundle it cannot vouch for, in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.manifest import BOARD_MODEL
from tests.support import copy_bundle, edit_manifest, run_cli

pytestmark = pytest.mark.e2e


def check(bundle: Path):  # type: ignore[no-untyped-def]
    return run_cli("agent", "check", "--set", f"model.dir={bundle}")


def test_check_passes_and_reproduces_the_host_sample_bit_exactly(bundle: Path) -> None:
    proc = check(bundle)
    assert proc.returncode == 0, proc.stderr
    assert "max |logit diff| 0," in proc.stdout
    assert proc.stderr == ""  # no deprecation noise in the board's journal


def test_tampered_model_is_refused_before_loading(bundle: Path, tmp_path: Path) -> None:
    b = copy_bundle(bundle, tmp_path)
    with (b / BOARD_MODEL).open("ab") as f:
        f.write(b"\0")
    proc = check(b)
    assert proc.returncode == 2 and "sha256" in proc.stderr and "Traceback" not in proc.stderr


def test_manifest_from_a_newer_schema_is_refused(bundle: Path, tmp_path: Path) -> None:
    b = copy_bundle(bundle, tmp_path)
    edit_manifest(b, schema="edgeforge.bundle/9")
    proc = check(b)
    assert proc.returncode == 2 and "newer than this agent" in proc.stderr


def test_missing_bundle_is_one_line(tmp_path: Path) -> None:
    proc = check(tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("BundleError:") and "no manifest" in proc.stderr
