"""The board runtime matrix: which torch builds work on which board CPUs. One place, stdlib only.

It is consulted before torch is imported, because a torch that does not fit the CPU dies
with SIGILL at import, before any Python error handling could help. `edge-agent` refuses a
known-bad torch with one line saying what to install instead. deploy/install-agent.sh and
the emulated board (deploy/emulated-board/) install `recommend(machine)`. Every "works"
entry is proven by the emulated-board run in CI (tests/prove_arm.py), on the CPUs listed.

    python -m agent.torch_matrix recommend [--machine aarch64]   # the pip spec for this board
    python -m agent.torch_matrix status                          # this board against the matrix
"""

from __future__ import annotations

import argparse
import platform
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from agent.errors import RuntimeMismatch


@dataclass(frozen=True)
class Cpu:
    """What /proc/cpuinfo says about the board's CPU."""

    machine: str
    part: str | None  # e.g. 0xd08
    features: frozenset[str]

    @property
    def name(self) -> str:
        known = CPU_PARTS.get(self.part or "")
        return known[0] if known else (f"CPU part {self.part}" if self.part else self.machine)

    @property
    def core(self) -> str | None:
        """The core's name as QEMU_CPU spells it (cortex-a72), when the part is known."""
        known = CPU_PARTS.get(self.part or "")
        return known[1] if known else None


# ARM's CPU part numbers (MIDR) for the boards we target: display name, QEMU_CPU name.
CPU_PARTS = {"0xd03": ("Cortex-A53 (Pi 3, Zero 2)", "cortex-a53"),
             "0xd08": ("Cortex-A72 (Pi 4)", "cortex-a72"),
             "0xd0b": ("Cortex-A76 (Pi 5)", "cortex-a76")}


@dataclass(frozen=True)
class Build:
    """One torch release on one machine type: does it work, and on which CPUs was it proven."""

    version: str
    machine: str
    works: bool
    needs: frozenset[str]  # /proc/cpuinfo Features the build requires ("atomics": ARMv8.1)
    proven_on: tuple[str, ...]
    note: str


MATRIX = (
    Build("2.9.1", "aarch64", True, frozenset(), ("cortex-a72", "cortex-a76"),
          "PyPI's CPU-only aarch64 wheel (104 MB); qnnpack static int8 bit-exact to the host"),
    Build("2.10.0", "aarch64", False, frozenset({"atomics"}), (),
          "CPU-only wheel, but libc10 uses ARMv8.1 atomics: SIGILL at import on a Cortex-A72 "
          "(Pi 4)"),
    Build("2.11+", "aarch64", False, frozenset(), (),
          "PyPI's aarch64 wheels from 2.11 on are CUDA builds that pull about 2.7 GB of NVIDIA "
          "wheels; 2.13's multi-threaded fp32 BLAS dies with SIGILL on a Cortex-A72"),
)
RECOMMENDED = {"aarch64": "torch==2.9.1"}


def read_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> Cpu:
    """The CPU's part number and feature flags; empty where /proc/cpuinfo does not say."""
    part, features = None, frozenset[str]()
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "cpu part" and part is None:
            part = value.strip().lower()
        elif key == "features" and not features:
            features = frozenset(value.split())
    return Cpu(platform.machine(), part, features)


def _release(version: str) -> tuple[int, ...]:
    core = version.split("+")[0]
    return tuple(int(p) for p in core.split(".")[:3] if p.isdigit())


def entry_for(version: str, machine: str) -> Build | None:
    """The matrix entry covering torch `version` on `machine`, if any."""
    release = _release(version)
    for build in MATRIX:
        if build.machine != machine:
            continue
        if build.version.endswith("+"):
            if release >= _release(build.version[:-1]):
                return build
        elif release == _release(build.version):
            return build
    return None


def installed_torch() -> str | None:
    """The installed torch's version, read from its metadata without importing it."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def assess(version: str, cpu: Cpu) -> tuple[str, str]:
    """("ok" | "unproven" | "bad", message) for torch `version` on `cpu`."""
    if cpu.machine not in RECOMMENDED:
        return "ok", f"torch {version} on {cpu.machine}: not a board this matrix covers"
    build = entry_for(version, cpu.machine)
    fix = f"pip install '{RECOMMENDED[cpu.machine]}'"
    if build is None:
        return "unproven", (f"torch {version} on {cpu.name} is not in edgeforge's runtime "
                            f"matrix: not proven to run here ({fix} is)")
    if not build.works:
        missing = build.needs - cpu.features
        if not build.needs or missing:
            return "bad", (f"torch {version} is known to fail on {cpu.name}: {build.note} "
                           f"({fix})")
        return "unproven", (f"torch {version} needs {', '.join(sorted(build.needs))}, which "
                            f"this {cpu.name} has; still not proven here ({fix} is)")
    if cpu.core not in build.proven_on:
        return "unproven", (f"torch {version} works on {', '.join(build.proven_on)} but has not "
                            f"been proven on this {cpu.name}: watch the first check and "
                            f"telemetry")
    return "ok", f"torch {version} on {cpu.name}: {build.note}"


def check_runtime(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """Refuse a known-bad torch before it is imported; return a warning for an unproven one.

    Raises:
        RuntimeMismatch: the installed torch is known to crash on this CPU.
    """
    version = installed_torch()
    if version is None:
        return None  # the import will fail with its own clear message
    verdict, message = assess(version, read_cpu(cpuinfo))
    if verdict == "bad":
        raise RuntimeMismatch(message)
    return message if verdict == "unproven" else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.torch_matrix",
                                description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("recommend", help="print the pip spec of the torch to install")
    r.add_argument("--machine", default=platform.machine())
    sub.add_parser("status", help="this board's CPU and torch against the matrix")
    args = p.parse_args(argv)
    if args.command == "recommend":
        spec = RECOMMENDED.get(args.machine)
        if spec is None:
            print(f"agent.torch_matrix: no board torch known for {args.machine}; install torch as "
                  f"usual (the host pins 2.13.0)", file=sys.stderr)
            return 2
        print(spec)
        return 0
    cpu = read_cpu()
    version = installed_torch()
    verdict, message = assess(version, cpu) if version else ("bad", "torch is not installed")
    print(f"{verdict}: {message}")
    return 0 if verdict != "bad" else 2


if __name__ == "__main__":
    raise SystemExit(main())
