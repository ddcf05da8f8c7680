"""The board runtime matrix: which torch is refused, warned about or recommended per CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.torch_matrix import Cpu, assess, dist_version, entry_for, read_cpu
from tests.support import run_cli

A72 = Cpu("aarch64", "0xd08", frozenset({"fp", "asimd", "crc32", "cpuid"}))
A76 = Cpu("aarch64", "0xd0b", frozenset({"fp", "asimd", "atomics", "asimddp"}))


@pytest.mark.unit
def test_reads_part_and_features_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
                    "CPU implementer\t: 0x41\nCPU part\t: 0xd08\n\nprocessor\t: 1\n")
    cpu = read_cpu(info)
    assert cpu.part == "0xd08" and "crc32" in cpu.features and "atomics" not in cpu.features
    assert cpu.name == "Cortex-A72 (Pi 4)"
    assert read_cpu(tmp_path / "missing").features == frozenset()


@pytest.mark.unit
def test_the_recommended_torch_is_ok_on_both_pis() -> None:
    for cpu in (A72, A76):
        verdict, message = assess("2.9.1", cpu)
        assert verdict == "ok" and "2.9.1" in message


@pytest.mark.unit
def test_torch_2_10_is_refused_on_a_pi_4_and_unproven_on_a_pi_5() -> None:
    verdict, message = assess("2.10.0", A72)
    assert verdict == "bad" and "atomics" in message and "torch==2.9.1" in message
    assert assess("2.10.0", A76)[0] == "unproven"


@pytest.mark.unit
def test_cuda_era_torch_is_refused_and_an_unknown_one_is_only_warned_about() -> None:
    assert assess("2.13.0", A76)[0] == "bad"
    assert entry_for("2.11.0+cu128", "aarch64") is not None
    verdict, message = assess("2.8.0", A72)
    assert verdict == "unproven" and "not in edgeforge's runtime matrix" in message


@pytest.mark.unit
def test_a_cpu_the_matrix_has_not_proven_gets_a_warning_not_a_refusal() -> None:
    a53 = Cpu("aarch64", "0xd03", frozenset({"fp", "asimd"}))
    verdict, message = assess("2.9.1", a53)
    assert verdict == "unproven" and "Cortex-A53" in message and "cortex-a72" in message
    assert assess("2.9.1", Cpu("aarch64", None, frozenset()))[0] == "unproven"


@pytest.mark.unit
def test_other_machines_are_not_judged() -> None:
    assert assess("2.13.0", Cpu("x86_64", None, frozenset()))[0] == "ok"


@pytest.mark.e2e
def test_recommend_prints_a_pip_spec() -> None:
    proc = run_cli("agent.torch_matrix", "recommend", "--machine", "aarch64")
    assert proc.returncode == 0 and proc.stdout.strip() == "torch==2.9.1"
    proc = run_cli("agent.torch_matrix", "recommend", "--machine", "riscv64")
    assert proc.returncode == 2 and "no board torch known for riscv64" in proc.stderr


@pytest.mark.e2e
def test_onnxruntime_is_judged_by_its_own_entries() -> None:
    verdict, message = assess("1.32.0", A72, "onnxruntime")
    assert verdict == "ok" and "onnxruntime 1.32.0 on Cortex-A72 (Pi 4)" in message
    verdict, message = assess("1.20.0", A76, "onnxruntime")
    assert verdict == "unproven" and "pip install 'onnxruntime==1.32.0'" in message
    # torch's entries say nothing about an onnxruntime of the same number
    assert entry_for("2.9.1", "aarch64", "onnxruntime") is None
    proc = run_cli("agent.torch_matrix", "recommend", "--runtime", "onnxruntime",
                   "--machine", "aarch64")
    assert proc.returncode == 0 and proc.stdout.strip() == "onnxruntime==1.32.0"


@pytest.mark.unit
def test_executorch_runs_on_a_pi_5_and_is_never_loaded_on_a_pi_4(tmp_path: Path) -> None:
    """executorch 1.0.1 (the release for torch 2.9) needs the dot product a Pi 4 lacks: on an
    A72 its engine is refused before it is imported, with the reason; later releases need a
    torch the boards cannot run."""
    assert assess("1.0.1", A76, "executorch")[0] == "ok"
    verdict, message = assess("1.0.1", A72, "executorch")
    assert verdict == "bad" and "asimddp" in message and "SIGILL" in message
    assert assess("1.5.1", A76, "executorch")[0] == "bad"
    assert assess("1.5.1", Cpu("x86_64", None, frozenset()), "executorch")[0] == "ok"


@pytest.mark.unit
def test_versions_are_read_off_dist_info_and_debian_egg_info_folders(tmp_path: Path) -> None:
    """What pip and Debian leave in site-packages, read without importing anything; the
    first path entry that has the distribution wins, as imports do."""
    pip_site, debian_site = tmp_path / "venv", tmp_path / "dist-packages"
    for folder in ("torch-2.9.1+cpu.dist-info", "onnxruntime_gpu-1.32.0.dist-info",
                   "torch", "numpy-2.4.6.dist-info"):
        (pip_site / folder).mkdir(parents=True)
    for folder in ("torch-2.6.0-py3.11.egg-info", "PyYAML-6.0.1.egg-info"):
        (debian_site / folder).mkdir(parents=True)
    path = [str(tmp_path / "missing"), str(pip_site), str(debian_site)]
    assert dist_version("torch", path) == "2.9.1+cpu"
    assert dist_version("torch", path[::-1]) == "2.6.0"
    assert dist_version("onnxruntime-gpu", path) == "1.32.0"
    assert dist_version("onnxruntime", path) is None
    assert dist_version("pyyaml", path) == "6.0.1"
    assert dist_version("num", path) is None
