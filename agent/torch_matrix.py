"""The board runtime matrix: which torch, onnxruntime and executorch builds work on which
board CPUs. One place, stdlib only.

It is consulted before a runtime is imported, because a build that does not fit the CPU dies
with SIGILL at import, before any Python error handling could help. `edge-agent` refuses a
known-bad torch or onnxruntime with one line saying what to install instead; a known-bad
executorch is never loaded, and its engine's proof fails with that line (agent/engines).
deploy/install-agent.sh and the emulated board (deploy/emulated-board/) install `recommend`'s
pick for each runtime of the board's profile. Every "works" entry is proven by the
emulated-board run in CI (tests/prove_arm.py), on the CPUs and Python versions listed.

    python -m agent.torch_matrix recommend [--runtime torch|onnxruntime] [--machine aarch64]
    python -m agent.torch_matrix recommend --profile torch|onnx|both [--torch SPEC]
                                             # one pip spec per line: a profile's runtimes
    python -m agent.torch_matrix status      # each installed runtime against the matrix
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
from dataclasses import dataclass
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
    """One runtime release on one machine type: does it work, and on which CPUs it was proven."""

    runtime: str  # torch | onnxruntime
    version: str
    machine: str
    works: bool
    needs: frozenset[str]  # /proc/cpuinfo Features the build requires ("atomics": ARMv8.1)
    proven_on: tuple[str, ...]
    note: str


MATRIX = (
    Build("torch", "2.9.1", "aarch64", True, frozenset(), ("cortex-a72", "cortex-a76"),
          "PyPI's CPU-only aarch64 wheel (104 MB; Python 3.11 and 3.13); qnnpack static int8 "
          "bit-exact to the host"),
    Build("torch", "2.10.0", "aarch64", False, frozenset({"atomics"}), (),
          "CPU-only wheel, but libc10 uses ARMv8.1 atomics: SIGILL at import on a Cortex-A72 "
          "(Pi 4)"),
    Build("torch", "2.11+", "aarch64", False, frozenset(), (),
          "PyPI's aarch64 wheels from 2.11 on are CUDA builds that pull about 2.7 GB of NVIDIA "
          "wheels; 2.13's multi-threaded fp32 BLAS dies with SIGILL on a Cortex-A72"),
    Build("onnxruntime", "1.32.0", "aarch64", True, frozenset(), ("cortex-a72", "cortex-a76"),
          "PyPI's aarch64 wheel (23 MB; Python 3.11 and 3.13); int8 QDQ bit-exact to the "
          "host"),
    # ExecuTorch links against the torch it was built for: 1.0.1 is the release for torch
    # 2.9. `needs` of a working build: the features it cannot run without.
    Build("executorch", "1.0.1", "aarch64", True, frozenset({"asimddp"}), ("cortex-a76",),
          "PyPI's aarch64 wheel (10 MB, Python 3.11 only, for torch 2.9); runs the programs "
          "edge-optimize writes bit-exact to the host on a Cortex-A76, and dies with SIGILL "
          "at the first inference on a Cortex-A72 (an ARMv8.0 core without the dot product)"),
    Build("executorch", "1.1+", "aarch64", False, frozenset(), (),
          "built for torch 2.10 or later, whose aarch64 wheels do not run as CPU-only builds "
          "on the boards (see torch)"),
)
RECOMMENDED = {("torch", "aarch64"): "torch==2.9.1",
               ("onnxruntime", "aarch64"): "onnxruntime==1.32.0",
               ("executorch", "aarch64"): "executorch==1.0.1"}
RUNTIMES = ("torch", "onnxruntime")
# A board's profile: which runtimes it installs (install-agent.sh, flash, the playbook).
PROFILES = {"torch": ("torch",), "onnx": ("onnxruntime",), "both": ("torch", "onnxruntime")}


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


def entry_for(version: str, machine: str, runtime: str = "torch") -> Build | None:
    """The matrix entry covering `runtime` `version` on `machine`, if any."""
    release = _release(version)
    for build in MATRIX:
        if build.machine != machine or build.runtime != runtime:
            continue
        if build.version.endswith("+"):
            if release >= _release(build.version[:-1]):
                return build
        elif release == _release(build.version):
            return build
    return None


def installed(runtime: str = "torch") -> str | None:
    """The installed `runtime`'s version, read from its metadata without importing it."""
    return dist_version(runtime)


def dist_version(dist: str, path: list[str] | None = None) -> str | None:
    """The version of distribution `dist` found on `path` (sys.path), or None: the name of
    its `<name>-<version>.dist-info` (pip) or `.egg-info` (Debian, setuptools) folder, the
    first path entry that has one winning, as imports do. One directory listing per entry,
    where importing importlib.metadata took 50 ms of the agent's 0.5 s torch-free cold
    start here (README: the engine targets)."""
    def normal(name: str) -> str:  # PEP 503: "ONNX.Runtime-GPU" is "onnx_runtime_gpu"
        return re.sub(r"[-_.]+", "_", name).lower()

    key = normal(dist)
    for entry in sys.path if path is None else path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            stem, _, kind = name.rpartition(".")
            project, _, version = stem.partition("-")
            if kind in ("dist-info", "egg-info") and version and normal(project) == key:
                return re.sub(r"-py\d+(\.\d+)?$", "", version)  # Debian's egg-info: -py3.11
    return None


def assess(version: str, cpu: Cpu, runtime: str = "torch") -> tuple[str, str]:
    """("ok" | "unproven" | "bad", message) for `runtime` `version` on `cpu`."""
    name = f"{runtime} {version}"
    if (runtime, cpu.machine) not in RECOMMENDED:
        return "ok", f"{name} on {cpu.machine}: not a board this matrix covers"
    build = entry_for(version, cpu.machine, runtime)
    fix = f"pip install '{RECOMMENDED[runtime, cpu.machine]}'"
    if build is None:
        return "unproven", (f"{name} on {cpu.name} is not in edgeforge's runtime "
                            f"matrix: not proven to run here ({fix} is)")
    if build.works and build.needs - cpu.features:
        return "bad", (f"{name} needs {', '.join(sorted(build.needs - cpu.features))}, which "
                       f"this {cpu.name} lacks: {build.note}")
    if not build.works:
        missing = build.needs - cpu.features
        if not build.needs or missing:
            return "bad", f"{name} is known to fail on {cpu.name}: {build.note} ({fix})"
        return "unproven", (f"{name} needs {', '.join(sorted(build.needs))}, which "
                            f"this {cpu.name} has; still not proven here ({fix} is)")
    if cpu.core not in build.proven_on:
        return "unproven", (f"{name} works on {', '.join(build.proven_on)} but has not "
                            f"been proven on this {cpu.name}: watch the first check and "
                            f"telemetry")
    return "ok", f"{name} on {cpu.name}: {build.note}"


def check_runtime(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """Refuse a known-bad runtime before it is imported; return a warning for unproven ones.

    Raises:
        RuntimeMismatch: an installed runtime is known to crash on this CPU.
    """
    cpu = read_cpu(cpuinfo)
    warnings = []
    for runtime in RUNTIMES:
        version = installed(runtime)
        if version is None:
            continue  # not this board's profile: the engine says so if it is asked for
        verdict, message = assess(version, cpu, runtime)
        if verdict == "bad":
            raise RuntimeMismatch(message)
        if verdict == "unproven":
            warnings.append(message)
    return "; ".join(warnings) or None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.torch_matrix",
                                description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("recommend", help="print the pip spec of a runtime to install")
    r.add_argument("--runtime", choices=(*RUNTIMES, "executorch"), default="torch")
    r.add_argument("--profile", choices=PROFILES, default=None,
                   help="print the spec of each of the profile's runtimes, one per line")
    r.add_argument("--torch", default="", metavar="SPEC", help="torch spec to use instead")
    r.add_argument("--machine", default=platform.machine())
    sub.add_parser("status", help="this board's CPU and runtimes against the matrix")
    args = p.parse_args(argv)
    if args.command == "recommend":
        for runtime in PROFILES[args.profile] if args.profile else (args.runtime,):
            spec = args.torch if runtime == "torch" and args.torch else \
                RECOMMENDED.get((runtime, args.machine))
            if spec is None and runtime == "onnxruntime":
                spec = runtime  # PyPI's onnxruntime is CPU-only everywhere: no trap to avoid
            if spec is None:
                print(f"agent.torch_matrix: no board {runtime} known for {args.machine}; "
                      f"install {runtime} as usual" + (" (or pass --torch SPEC)"
                                                       if runtime == "torch" else ""),
                      file=sys.stderr)
                return 2
            print(spec)
        return 0
    cpu = read_cpu()
    verdicts = [(rt, assess(v, cpu, rt)) for rt in RUNTIMES if (v := installed(rt))]
    if not verdicts:
        print("bad: neither torch nor onnxruntime is installed (install the board's profile: "
              "install-agent.sh --profile torch|onnx|both)")
        return 2
    for _, (verdict, message) in verdicts:
        print(f"{verdict}: {message}")
    return 2 if any(v == "bad" for _, (v, _) in verdicts) else 0


if __name__ == "__main__":
    raise SystemExit(main())
