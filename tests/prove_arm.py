"""The ARM proof: emulated Raspberry Pi 4 and Pi 5 boards, on Debian bookworm and trixie, run
the bundle this run built on both engines.

    .venv/bin/python -m tests.prove_arm [--roots build] [--cpus cortex-a72,cortex-a76]
                                        [--suites bookworm,trixie]

1. builds a bundle on this x86 host with `edge-optimize run --data synthetic` (ARM_CONFIG): the
   TorchScript file for qnnpack, the ONNX int8 QDQ file for ONNX Runtime and the ExecuTorch
   XNNPACK program;
2. for each Debian release (bookworm: Python 3.11; trixie: Python 3.13, what Raspberry Pi OS
   is based on now), installs the agent the way the README tells a Pi owner to, on the first
   CPU: deploy/emulated-board/install-board.sh runs `edge-deploy render` here and the folder's
   `install-agent.sh` as written, profile `both`, inside a Debian arm64 chroot (qemu-aarch64
   through binfmt_misc; the roots are kept between runs), which installs the runtime matrix's
   torch and onnxruntime for that Python and the agent alone, and activates the signed
   bundle (the on-board check of both engines included);
3. for each release and CPU, with QEMU_CPU set (the default `max` CPU, with 512-bit SVE, gave
   wrong fp32 results) and a fake /proc/cpuinfo and /sys cpu list for 4 cores of that model,
   runs the installed agent (/opt/edgeforge/venv) in the chroot:
   - `python -m agent.torch_matrix status` judges both runtimes "ok" against the matrix;
   - on the first release and CPU, a TorchScript file for an engine this board lacks and a
     manifest from a newer schema are each refused in one line (the store's current version,
     as the service runs it, was checked by the install's `edge-agent activate`);
   - on bookworm, with torch 2.10.0's metadata faked in front of the real torch,
     `edge-agent check` refuses it in one line on the Cortex-A72 (no ARMv8.1 atomics) and
     only warns on the Cortex-A76, where the engines' proof below runs with it;
   - `edge-agent bench` proves each engine (its check: sha256, embedded metadata, the
     bundled sample reproducing that engine's host logits, bit-exact: all are static int8,
     and accuracy), times each proven one (20 passes: shown, not judged) and names the one
     the agent runs; its table is printed for each release and CPU;
   - ExecuTorch: on bookworm (Python 3.11, the only Python the runtime matrix's executorch
     1.0.1 has an aarch64 wheel for) it is unpacked into the board's venv; the A76 proves
     it with the other two engines (a program written by the host's newer executorch), and
     on the A72, which lacks the dot product that release needs, `model.engine=executorch`
     is refused in one line before the runtime is loaded; trixie says it is not installed;
   - on bookworm's first CPU, `edge-agent run` with a `folder` source and `engine: auto`
     classifies FOLDER_IMAGES PNG files of the stand-in test images dropped into a folder
     (the installer's default `images` extra; the torch-free run below does it on the
     A76); every result's top-3 labels and scores equal the
     host's for the same file and the engine the result names, exactly; it publishes at
     least 3 telemetry windows to a real mosquitto on the host's loopback (a chroot shares
     the host network) and exits 0 on SIGTERM, after publishing `offline`;
   - on bookworm, the guest instructions per batch-1 inference of each engine, counted by
     QEMU itself with the project's TCG plugin (deploy/emulated-board/insn_count.c, built
     here with cc, run by Debian's dynamic qemu-aarch64 copied into the root);
   - on bookworm's last CPU (the Pi 5's A76), a second bundle: torchvision's
     mobilenet_v3_small at 224x224 (random start, a generated folder of PNG and JPEG photos,
     static int8 through graph mode), proven on TorchScript and ONNX Runtime by `edge-agent
     bench` and its guest instructions per image counted the same way; its ExecuTorch file
     is checked too, and the table says what the check found (the board's XNNPACK kernels
     do not reproduce the host's int8 logits for this model, so the check refuses it);
   - on the same CPU, a bundle of SimpleCNN structured-pruned to 0.5 of its MACs (the same
     baseline, prune.method=structured), proven, raced and counted like the others: the
     instruction table shows what removing channels saves on the board;
   - on the same CPU, a third bundle: the SimpleCNN bundle exported again with its fp32
     files (export.fp32_candidates=true): `edge-agent bench` proves the int8 files bit-exact
     and the fp32 files within the logit tolerance (fp32 kernels sum in another order on ARM
     than on x86), races all of them and names the one the agent runs, and every file's
     guest instructions per image are counted: whether int8 or fp32 is cheaper on that core;
4. the torch-free profile: the first release's install is run again with `--profile onnx`
   (the installer sheds torch), `import torch` must fail in the board's venv, `edge-agent
   bench` proves and times ONNX Runtime alone, and the folder run above serves every file from the
   ONNX model on the last CPU. (On bookworm, whose root is made first: trixie's root comes
   last in CI, so its chain is kept short.)
The two releases run at once, each in a thread of its own (their roots, brokers and bundle
copies are separate): the slower one sets the time. Prints one row per release and CPU,
then each board's `edge-agent bench` table and the instruction table, and exits 1 if any
check fails. Timings under emulation mean nothing: bench's are shown as what a board owner
sees, and judged on nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from agent.torch_matrix import RECOMMENDED
from tests.support import ROOT, bundle_config
from tests.support.broker import Broker, Subscriber
from tests.support.image_folder import write as write_photos
from tests.support.media import host_top, png_bytes, results, sample_images, write_pngs

# Enough training that "the same top-1 accuracy as the host" means something (well above the
# 10 % of chance), and short, because it runs beside the tests on CI's critical path.
ARM_CONFIG = bundle_config(10000, 2, 0.001, 32)
# ExecuTorch on the boards: the runtime matrix's release (built for the boards' torch 2.9),
# whose aarch64 wheel exists for Python 3.11 (bookworm) only; on a core without the dot
# product (the Pi 4's A72) the agent must refuse it, never load it.
EXECUTORCH_PYTHONS = ("3.11",)

FOLDER_IMAGES = 16  # PNG files the emulated board classifies
# The second model: torchvision's MobileNet at its own input size, from a photo folder.
MOBILENET = "torchvision.models:mobilenet_v3_small"
MOBILENET_SETS = ("data.root={photos}", f"train.factory={MOBILENET}",
                  "train.input_shape=[3,224,224]", "train.epochs=1", "data.batch_size=8",
                  "prune.finetune_epochs=0", "quantize.calibration_images=16",
                  "quantize.max_accuracy_drop=100", "quantize.source=baseline",
                  "export.sample_size=8",  # int8 of the trained model: 70 % pruning loses it
                  # the three int8 files alone (the SimpleCNN +fp32 bundle is the fp32 race)
                  "export.executorch=true", "export.fp32_candidates=false")


MOBILENET_MODEL, FP32_MODEL = "mobilenet_v3_small 224", "SimpleCNN 32 +fp32"
STRUCTURED_MODEL = "SimpleCNN 32 0.5 MACs"  # structured pruning


def build_mobilenet(work: Path) -> Path:
    """The mobilenet_v3_small bundle (train, prune, quantize, export: no host report)."""
    photos, out = work / "photos", work / "bundle-mobilenet"
    write_photos(photos, 8, sizes=((240, 320), (224, 224), (300, 260)))
    sets = [a for s in MOBILENET_SETS for a in ("--set", s.format(photos=photos))]
    for step in ("train", "prune", "quantize", "export"):
        proc = subprocess.run([sys.executable, "-m", "optimizer", step, "--data", "folder",
                               "--out", str(out), *sets], cwd=ROOT, capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"mobilenet {step}: {proc.stderr.strip()[-800:]}")
    return out


def build_fp32(config: Path, built: Path, work: Path) -> Path:
    """The SimpleCNN bundle exported again with its fp32 files (export.fp32_candidates)."""
    out = work / "bundle-fp32"
    shutil.copytree(built, out)
    proc = subprocess.run([sys.executable, "-m", "optimizer", "export", "--data", "synthetic",
                           "--config", str(config), "--out", str(out), "--set",
                           "export.fp32_candidates=true"], cwd=ROOT, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"fp32 export: {proc.stderr.strip()[-800:]}")
    return out


def build_structured(config: Path, built: Path, work: Path) -> Path:
    """The SimpleCNN bundle's baseline pruned again with channels removed (0.5 of the MACs),
    then quantized and exported: what structured pruning saves on the board."""
    out = work / "bundle-structured"
    out.mkdir()
    shutil.copy2(built / "baseline_cnn.pth", out / "baseline_cnn.pth")
    for step in ("prune", "quantize", "export"):
        proc = subprocess.run([sys.executable, "-m", "optimizer", step, "--data", "synthetic",
                               "--config", str(config), "--out", str(out), "--set",
                               "prune.method=structured", "--set",
                               "prune.target_macs_ratio=0.5"], cwd=ROOT, capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"structured {step}: {proc.stderr.strip()[-800:]}")
    return out


def prove_model(board: Board, bundle: str, suite: str, model: str,
                engines: tuple[str, ...], also: tuple[str, ...] = ()) -> dict[str, object]:
    """Another bundle's checks on this board: `engines` proven (int8 bit-exact), timed,
    and their instructions counted; what the check said of the files in `also`, recorded."""
    row: dict[str, object] = {"suite": suite, "cpu": board.cpu, "ok": False, "model": model}
    for name, step in (("engines", lambda: engines_proven(board, bundle, row, engines,
                                                          also=also)),
                       ("instructions", lambda: count_instructions(board, bundle, row))):
        problem = step()
        if problem is not None:
            row["failure"] = f"{model} {name}: {problem}"
            return row
    row["ok"] = True
    return row

# /proc/cpuinfo of the emulated boards, as their kernels print it.
CPUS = {
    "cortex-a72": ("Raspberry Pi 4 Model B Rev 1.4", "0x0", "0xd08", "3",
                   "fp asimd evtstrm crc32 cpuid"),
    "cortex-a76": ("Raspberry Pi 5 Model B Rev 1.0", "0x4", "0xd0b", "1",
                   "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
                   "asimdrdm lrcpc dcpop asimddp"),
}


def cpuinfo_text(cpu: str) -> str:
    """/proc/cpuinfo of 4 cores of `cpu`, as a Raspberry Pi's kernel prints it."""
    model, variant, part, revision, features = CPUS[cpu]
    blocks = [f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {features}\n"
              f"CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: {variant}\n"
              f"CPU part\t: {part}\nCPU revision\t: {revision}\n" for i in range(4)]
    return "\n".join(blocks) + f"\nModel\t\t: {model}\n"


def fake_cpu_files(root: Path, cpu: str) -> None:
    """A fake /proc/cpuinfo and /sys/devices/system/cpu for 4 cores of `cpu` (no real board).

    Without /sys, QNNPACK fails to initialise; with the host's x86 /sys, torch segfaults.
    """
    (root / "proc").mkdir(exist_ok=True)
    if not (root / "proc/self").exists():  # not while a real /proc is mounted there
        (root / "proc/cpuinfo").write_text(cpuinfo_text(cpu))
    sysdir = root / "sys/devices/system/cpu"
    sysdir.mkdir(parents=True, exist_ok=True)
    for name in ("online", "possible", "present"):
        (sysdir / name).write_text("0-3\n")
    for i in range(4):
        (sysdir / f"cpu{i}").mkdir(exist_ok=True)


@contextlib.contextmanager
def board_proc(root: Path, cpu: str) -> Iterator[None]:
    """The chroot's real /proc (psutil reads it), with the fake cpuinfo of `cpu` bound over
    /proc/cpuinfo; unmounted afterwards."""
    fake = root.parent / f"{root.name}.cpuinfo"
    fake.write_text(cpuinfo_text(cpu))
    proc = root / "proc"
    subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True)
    try:
        subprocess.run(["mount", "--bind", str(fake), str(proc / "cpuinfo")], check=True)
        try:
            yield
        finally:
            subprocess.run(["umount", str(proc / "cpuinfo")], check=False)
    finally:
        subprocess.run(["umount", str(proc)], check=False)


class Board:
    """The installed agent's Python in the emulated root, entered with chroot (qemu via binfmt)."""

    PYTHON = "/opt/edgeforge/venv/bin/python"  # where deploy/install-agent.sh put it

    def __init__(self, root: Path, cpu: str, workdir: str) -> None:
        self.root, self.cpu, self.workdir = root, cpu, workdir  # workdir: a path on the board
        shutil.rmtree(self.host(workdir), ignore_errors=True)
        self.host(workdir).mkdir(parents=True)
        # The proof's own agent commands read the built-in defaults, not the installed
        # /etc/edgeforge/config.yaml (whose signing key would refuse the unsigned copies).
        self.config = f"{workdir}/defaults.yaml"
        self.host(self.config).write_text("{}\n")

    def host(self, path: str) -> Path:
        """Where a path on the board is on this host."""
        return self.root / path.lstrip("/")

    def argv(self, *args: str, pythonpath: str | None = None) -> list[str]:
        env = [f"QEMU_CPU={self.cpu}", "PATH=/opt/edgeforge/venv/bin:/usr/bin:/bin",
               "HOME=/root", "LANG=C.UTF-8"] + ([f"PYTHONPATH={pythonpath}"] if pythonpath else [])
        return ["chroot", str(self.root), "/usr/bin/env", "-i", *env, self.PYTHON, *args]

    def run(self, *args: str, timeout: float = 600,
            pythonpath: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args, pythonpath=pythonpath), capture_output=True,
                              text=True, timeout=timeout)

    def agent(self, command: str, *args: str, pythonpath: str | None = None
              ) -> subprocess.CompletedProcess[str]:
        """`python -m agent COMMAND --config <the defaults> ARGS` on the board."""
        return self.run("-m", "agent", command, "--config", self.config, *args,
                        pythonpath=pythonpath)

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*args), text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)


def refuses_bad_bundles(board: Board, bundle: str) -> str | None:
    """A TorchScript file for an engine this board lacks, and a newer manifest: one line,
    exit 2."""
    cases = {"x86 engine": (lambda m: m["engines"]["torchscript"].update(
                                quantized_engine="x86"),
                            ["--set", "model.engine=torchscript"],
                            "quantized engine 'x86' is not available"),
             "newer schema": (lambda m: m.update(schema="edgeforge.bundle/9"), [],
                              "newer than this agent")}
    for name, (change, args, needle) in cases.items():
        copy = f"{board.workdir}/bundle-{name.replace(' ', '-')}"
        shutil.copytree(board.host(bundle), board.host(copy))
        manifest = json.loads((board.host(copy) / "manifest.json").read_text())
        change(manifest)
        (board.host(copy) / "manifest.json").write_text(json.dumps(manifest))
        proc = board.agent("check", "--set", f"model.dir={copy}", *args)
        lines = proc.stderr.strip().splitlines()
        if proc.returncode != 2 or len(lines) != 1 or needle not in lines[0]:
            return f"{name}: exit {proc.returncode}, stderr {proc.stderr[-300:]!r}"
    return None


BENCH_ITERS, BENCH_WARMUP = 20, 5  # timings under emulation mean nothing: enough to show them
FILE_NAME = r"((?:torchscript|onnxruntime|executorch)(?:-fp32)?)"  # a bundle's model file
BENCH_ROW = re.compile(rf"^{FILE_NAME} +1 +\d+ +[0-9.]+ ", re.M)
ENGINE_FAILED = re.compile(rf"^{FILE_NAME} \S+: failed \((.*)\)$", re.M)
ENGINE_LINE = re.compile(rf"^{FILE_NAME} (\S+): proven, sample of \d+ "
                         r"(bit-exact|max \|logit diff\| ([0-9.eE+-]+)) to the host, accuracy "
                         r"([0-9.]+)%$", re.M)


def engines_proven(board: Board, bundle: str, row: dict[str, object],
                   engines: tuple[str, ...], pythonpath: str | None = None,
                   warning: str | None = None, also: tuple[str, ...] = ()) -> str | None:
    """`edge-agent bench` (the check of every engine, then BENCH_ITERS timed passes of each
    proven one) proves each of `engines` bit-exact, at the host's sample accuracy, times them
    and says which one the agent runs; it prints nothing on stderr but lines that contain
    `warning`, when one is given. The files in `also` may be proven or refused: what their
    check said is recorded either way."""
    check = board.agent("bench", "--set", f"model.dir={bundle}", "--set",
                        f"loop.warmup={BENCH_WARMUP}", "--iters", str(BENCH_ITERS),
                        pythonpath=pythonpath)
    row["bench"] = (check.stdout.strip() or check.stderr.strip())[-1500:]
    stray = [line for line in check.stderr.strip().splitlines()
             if warning is None or warning not in line]
    if check.returncode != 0 or stray or (warning is not None and not check.stderr.strip()):
        return f"edge-agent bench (exit {check.returncode}): {check.stderr.strip()[-500:]}"
    runs = re.search(r"^runs: (\S+)", check.stdout, re.M)
    timed = {m.group(1) for m in BENCH_ROW.finditer(check.stdout)}
    if runs is None or runs.group(1) not in timed \
            or not set(engines) <= timed <= set(engines) | set(also):
        return f"edge-agent bench: expected {engines} timed and one of them run: " \
               f"{check.stdout[-600:]}"
    row["bench_runs"] = runs.group(1)
    for failed in ENGINE_FAILED.finditer(check.stdout):
        if failed.group(1) in also:
            row[failed.group(1)] = failed.group(2)[:300]
    manifest = json.loads((board.host(bundle) / "manifest.json").read_text())
    proofs = {m.group(1): m for m in ENGINE_LINE.finditer(check.stdout)}
    for engine in (*engines, *(e for e in also if e in proofs)):
        m = proofs.get(engine)
        if m is None:
            return f"{engine} not proven: {check.stdout[-400:]}"
        host = float(manifest["engines"][engine]["sample_accuracy_pct"])
        row[engine] = {"version": m.group(2), "bit_exact": m.group(3) == "bit-exact",
                       "sample_accuracy_pct": float(m.group(5)), "host_pct": host}
        # fp32 kernels sum in another order on ARM than on x86: within the bundle's logit
        # tolerance (the board's check), not bit for bit.
        if m.group(3) != "bit-exact" and not engine.endswith("-fp32"):
            return f"{engine}: logits are not bit-exact to the host's ({m.group(3)})"
        if abs(float(m.group(5)) - host) > 0.01:
            return f"{engine}: sample accuracy {m.group(5)}% here, {host:.2f}% on the host"
    return None


def fake_torch_2_10(board: Board) -> str:
    """A fake of an installed torch 2.10.0 on the board: its metadata only (no such build can
    run here), found before the real torch's; the folder to put on PYTHONPATH."""
    fake = f"{board.workdir}/fake-torch-2.10"
    (board.host(fake) / "torch-2.10.0.dist-info").mkdir(parents=True, exist_ok=True)
    (board.host(fake) / "torch-2.10.0.dist-info/METADATA").write_text(
        "Metadata-Version: 2.1\nName: torch\nVersion: 2.10.0\n")
    return fake


def warned_and_proven(board: Board, bundle: str, row: dict[str, object],
                      engines: tuple[str, ...]) -> str | None:
    """On a core with ARMv8.1 atomics, torch 2.10.0 (the fake) only warns: the same
    `edge-agent bench` then proves and times the engines (one emulated run, not two)."""
    problem = engines_proven(board, bundle, row, engines, pythonpath=fake_torch_2_10(board),
                             warning="not proven here")
    row["torch_2_10"] = "warned" if problem is None else "not warned"
    return problem


def torch_2_10(board: Board, bundle: str, row: dict[str, object]) -> str | None:
    """torch 2.10.0 (the fake) on a core without ARMv8.1 atomics: refused in one line."""
    # model.engine=onnxruntime: the verdict comes before any runtime is imported.
    bad = board.agent("check", "--set", f"model.dir={bundle}", "--set",
                      "model.engine=onnxruntime", pythonpath=fake_torch_2_10(board))
    lines = bad.stderr.strip().splitlines()
    row["torch_2_10"] = "refused" if bad.returncode == 2 and len(lines) == 1 and \
        "known to fail" in lines[0] and "torch==2.9.1" in lines[0] else \
        f"exit {bad.returncode}: {bad.stderr[-300:]}"
    if row["torch_2_10"] != "refused":
        return f"torch 2.10.0 on {board.cpu}: expected refused, got {row['torch_2_10']}"
    return None


def serves_a_folder(board: Board, bundle: str, row: dict[str, object],
                    engine: str | None = None) -> str | None:
    """PNG files dropped into a folder the agent watches (engine: auto): each result carries
    the host's top-k labels and scores for its engine, exactly; telemetry and a clean stop.
    With `engine`, every result must come from that engine."""
    inbox = f"{board.workdir}/inbox"
    names = write_pngs(board.host(bundle), board.host(inbox), FOLDER_IMAGES)
    images, _ = sample_images(board.host(bundle))
    host = host_top(board.host(bundle), [
        png_bytes(images[i % images.shape[0]]) for i in range(FOLDER_IMAGES)])
    broker = Broker(board.host(board.workdir) / "broker")
    broker.start()
    sub = Subscriber(broker.port, client_id=f"prove-{board.cpu}-{time.monotonic_ns()}")
    agent = board.start("-m", "agent", "run", "--config", board.config,
                        "--set", f"model.dir={bundle}",
                        "--set", "mqtt.host=127.0.0.1", "--set", f"mqtt.port={broker.port}",
                        "--set", f"device.id=emulated-{board.cpu}", "--set", "loop.window_s=2",
                        "--set", "source.kind=folder", "--set", f"source.path={inbox}",
                        "--set", "source.poll_s=0.5", "--set", "loop.warmup=2",
                        "--set", f"spool.path={board.workdir}/spool.db")
    failure = None
    log = ""
    try:
        sub.wait_for(lambda: (len(sub.seqs()) >= 3 and len(sub.on("/result")) >= FOLDER_IMAGES)
                     or agent.poll() is not None, 600,
                     f"3 telemetry windows and {FOLDER_IMAGES} results")
        if agent.poll() is not None:
            raise AssertionError(f"edge-agent run exited {agent.returncode} early")
        agent.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        row["sigterm_exit"] = agent.wait(60)
        row["sigterm_s"] = round(time.monotonic() - t0, 1)
        sub.wait_for(lambda: sub.status() == "offline", 30, "offline")
    except AssertionError as exc:
        failure = str(exc)
    finally:
        if agent.poll() is None:
            agent.kill()
        log = agent.stdout.read() if agent.stdout else ""
        agent.wait()
        sub.close()
        broker.stop()
        (board.host(board.workdir) / f"agent-{time.monotonic_ns()}.log").write_text(log)
    if failure is not None:
        return f"{failure}; agent log: {log[-800:]}"
    row["windows"] = len(sub.telemetry())
    got = results(sub.on("/result"))
    expected = {r["source_id"]: dict(zip(names, host[r["engine"]], strict=True))
                [r["source_id"]] for r in got if r.get("engine") in host}
    same = [r["source_id"] for r in got if r["top"] == expected.get(r["source_id"])]
    row["served_by"] = ",".join(sorted({str(r.get("engine")) for r in got}))
    row["folder_results"] = f"{len(same)}/{FOLDER_IMAGES} equal to the host's"
    if sorted(same) != sorted(names) or len(got) != FOLDER_IMAGES:
        differ = [(r["source_id"], r.get("engine"), r["top"], expected.get(r["source_id"]))
                  for r in got if r["top"] != expected.get(r["source_id"])]
        return f"folder source: {row['folder_results']}, {len(got)} result(s): {differ[:3]}"
    if engine is not None and row["served_by"] != engine:
        return f"folder source: served by {row['served_by']}, expected {engine} alone"
    if row["sigterm_exit"] != 0:
        return f"SIGTERM exit {row['sigterm_exit']}: {log[-1000:]}"
    return None


# Runs inside the board's venv under the counting QEMU: each engine loaded from the verified
# bundle, warmed up, then COUNT_PASSES batch-1 passes between two marks.
COUNT_PASSES = 10
COUNT_SCRIPT = f"""
import os, sys
import numpy as np
from pathlib import Path
from agent.bundle import Bundle
from agent.errors import BundleError

def mark():
    try:
        os.close(-7777)  # insn_count.c writes its running count here
    except OSError:
        pass

b = Bundle.open(Path(sys.argv[1]))
x = np.random.default_rng(0).standard_normal((1, *b.manifest.input_shape), dtype=np.float32)
for engine in b.engines:
    try:
        runner = b.load(engine, 1)
    except BundleError:  # not installed here, or ruled out for this CPU by the matrix
        continue
    with runner.session():
        for _ in range(5):
            runner(x)
        mark()
        for _ in range({COUNT_PASSES}):
            runner(x)
        mark()
    print(engine)
"""


def count_instructions(board: Board, bundle: str, row: dict[str, object]) -> str | None:
    """Guest instructions per batch-1 inference of each engine on this CPU (insn_count.c)."""
    counts = f"{board.workdir}/insn-counts.txt"
    proc = subprocess.run(
        ["chroot", str(board.root), f"{COUNTER}/lib/ld-linux-x86-64.so.2", "--library-path",
         f"{COUNTER}/lib", f"{COUNTER}/qemu-aarch64", "-cpu", board.cpu, "-plugin",
         f"{COUNTER}/insn_count.so,out={counts}", Board.PYTHON, "-c", COUNT_SCRIPT, bundle],
        capture_output=True, text=True, timeout=900,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"})
    engines = proc.stdout.split()
    marks = [int(line.split()[1]) for line in board.host(counts).read_text().splitlines()
             if line.startswith("mark ")] if board.host(counts).is_file() else []
    if proc.returncode != 0 or len(marks) != 2 * len(engines) or not engines:
        return f"instruction count (exit {proc.returncode}): {proc.stderr[-500:]}"
    row["insns_per_inference"] = {
        engine: (marks[2 * i + 1] - marks[2 * i]) // COUNT_PASSES
        for i, engine in enumerate(engines)}
    return None


COUNTER = "/opt/qemu-count"  # in the root: Debian's dynamic qemu-aarch64, its libraries, plugin


def install_counter(root: Path) -> None:
    """Build insn_count.c and copy it, /usr/bin/qemu-aarch64 (package qemu-user: the static
    build cannot load plugins) and every library it links into ROOT/opt/qemu-count, so the
    x86 QEMU runs inside the chroot through its own loader."""
    dest = root / COUNTER.lstrip("/")
    (dest / "lib").mkdir(parents=True, exist_ok=True)
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-Wall", "-o", str(dest / "insn_count.so"),
                    str(ROOT / "deploy/emulated-board/insn_count.c")], check=True)
    qemu = shutil.which("qemu-aarch64")
    if qemu is None:
        raise RuntimeError("qemu-aarch64 (Debian package qemu-user) is not installed")
    shutil.copy2(qemu, dest / "qemu-aarch64")
    ldd = subprocess.run(["ldd", qemu], capture_output=True, text=True, check=True).stdout
    for line in ldd.splitlines():
        parts = line.split()
        lib = parts[2] if "=>" in parts and len(parts) > 3 else \
            parts[0] if parts and parts[0].startswith("/") else None
        if lib:
            shutil.copy(lib, dest / "lib" / Path(lib).name)


def prove(board: Board, bundle: str, suite: str, first: bool,
          folder: bool = True) -> dict[str, object]:
    """Every check of one release and CPU, in order; the row says what passed."""
    row: dict[str, object] = {"suite": suite, "cpu": board.cpu, "ok": False}
    status = board.run("-m", "agent.torch_matrix", "status")
    row["runtime"] = status.stdout.strip() or status.stderr.strip()
    lines = status.stdout.strip().splitlines()
    steps: list[tuple[str, Callable[[], str | None]]] = []
    if status.returncode != 0 or len(lines) != 2 or not all(x.startswith("ok:") for x in lines):
        row["failure"] = f"runtime status: {row['runtime']}"
        return row
    atomics = "atomics" in CPUS[board.cpu][4]
    if suite == "bookworm" and not atomics:
        steps.append(("torch 2.10", lambda: torch_2_10(board, bundle, row)))
    if first:
        # (The store's current version, as the service runs it, was checked by the
        # install's `edge-agent activate`: install-board.sh fails when it fails.)
        steps.append(("bad bundles", lambda: bad_bundles(board, bundle, row)))
    engines = board_engines(board.cpu, suite)
    if suite == "bookworm" and atomics:
        steps.append(("torch 2.10 + engines",
                      lambda: warned_and_proven(board, bundle, row, engines)))
    else:
        steps.append(("engines", lambda: engines_proven(board, bundle, row, engines)))
    if suite in EXECUTORCH_SUITES and "executorch" not in engines:
        steps.append(("executorch refused", lambda: executorch_refused(board, bundle, row)))
    if folder:
        steps.append(("folder", lambda: serves_a_folder(board, bundle, row)))
    if suite == "bookworm":
        steps.append(("instructions", lambda: count_instructions(board, bundle, row)))
    spent: dict[str, float] = {}
    row["steps_s"] = spent  # emulated seconds per step: where the proof's time goes
    for name, step in steps:
        t1 = time.monotonic()
        problem = step()
        spent[name] = round(time.monotonic() - t1, 1)
        if problem is not None:
            row["failure"] = f"{name}: {problem}"
            return row
    row["ok"] = True
    return row


def bad_bundles(board: Board, bundle: str, row: dict[str, object]) -> str | None:
    problem = refuses_bad_bundles(board, bundle)
    row["bad_bundles"] = "refused" if problem is None else "NOT refused"
    return problem


def torch_free(root: Path, bundle: Path, cpu: str, suite: str) -> dict[str, object]:
    """The install again with --profile onnx (torch shed), then the folder run on ONNX alone."""
    row: dict[str, object] = {"suite": suite, "cpu": cpu, "profile": "onnx", "ok": False}
    if not install(root, bundle, cpu, suite, "onnx")[0]:
        row["failure"] = "install-agent.sh --profile onnx failed"
        return row
    with board_proc(root, cpu):
        board = Board(root, cpu, f"/tmp/prove-{cpu}-onnx")
        probe = board.run("-c", "import torch")
        row["torch_import"] = "fails" if probe.returncode != 0 else "works"
        status = board.run("-m", "agent.torch_matrix", "status")
        row["runtime"] = status.stdout.strip()
        problem = ("torch is still importable on the onnx profile" if probe.returncode == 0
                   else f"runtime status: {row['runtime']}" if status.returncode != 0
                   or not status.stdout.startswith("ok: onnxruntime") else
                   engines_proven(board, "/root/bundle", row, ("onnxruntime",))
                   or serves_a_folder(board, "/root/bundle", row, "onnxruntime"))
    if problem is not None:
        row["failure"] = problem
        return row
    row["ok"] = True
    return row


ENGINES = ("torchscript", "onnxruntime")
EXECUTORCH_SUITES = ("bookworm",)  # the releases whose Python is in EXECUTORCH_PYTHONS


def board_engines(cpu: str, suite: str) -> tuple[str, ...]:
    """The engines a board of `cpu` on `suite` must prove: ExecuTorch too where its wheel
    installs and the core has the dot product its release needs."""
    dot = "asimddp" in CPUS[cpu][4].split()
    return ENGINES + ("executorch",) if suite in EXECUTORCH_SUITES and dot else ENGINES


def executorch_refused(board: Board, bundle: str, row: dict[str, object]) -> str | None:
    """On a core the runtime matrix rules out for it, `model.engine=executorch` is one line
    naming the reason, and the process lives to say it (no SIGILL)."""
    proc = board.agent("check", "--set", f"model.dir={bundle}", "--set",
                       "model.engine=executorch")
    lines = proc.stderr.strip().splitlines()
    row["executorch"] = lines[-1][-300:] if lines else proc.stdout[-300:]
    if proc.returncode != 2 or len(lines) != 1 or "not loaded: executorch" not in lines[0] \
            or "asimddp" not in lines[0]:
        return f"exit {proc.returncode}, stderr {proc.stderr[-400:]!r}"
    return None


def install_executorch(root: Path, suite: str) -> str:
    """The matrix's executorch unpacked into the board's venv by the host's pip (as the
    runtimes are, see install-board.sh); one line saying what was done."""
    pyver = subprocess.run(["chroot", str(root), "/usr/bin/python3", "-c",
                            "import sys; print('%d.%d' % sys.version_info[:2])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    spec = RECOMMENDED[("executorch", "aarch64")]
    if pyver not in EXECUTORCH_PYTHONS:
        return f"{suite}: {spec} has no aarch64 wheel for Python {pyver}: not installed"
    site = root / f"opt/edgeforge/venv/lib/python{pyver}/site-packages"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-deps", "--only-binary=:all:", "--platform", "manylinux_2_28_aarch64",
         "--python-version", pyver, "--implementation", "cp", "--abi",
         f"cp{pyver.replace('.', '')}", "--target", str(site), "--upgrade", spec],
        capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{suite}: pip install {spec} into the board: "
                           f"{proc.stderr.strip()[-400:]}")
    return f"{suite}: {spec} installed into the board's venv"


def install(root: Path, bundle: Path, cpu: str, suite: str, profile: str = "both"
            ) -> tuple[bool, float]:
    """install-board.sh (render, then install-agent.sh as written); its output in
    ROOT.install.log, the tail of it printed if it fails."""
    t1 = time.monotonic()
    log = root.parent / f"{root.name}.install.log"
    with log.open("a") as out:
        ok = subprocess.run(["bash", str(ROOT / "deploy/emulated-board/install-board.sh"),
                             str(bundle), cpu, str(root)], cwd=ROOT, stdout=out,
                            stderr=subprocess.STDOUT,
                            env={**os.environ, "SUITE": suite, "PROFILE": profile}
                            ).returncode == 0
    spent = time.monotonic() - t1
    if not ok:
        print(log.read_text()[-3000:], flush=True)
    print(f"prove_arm: README install (profile {profile}) {'PASS' if ok else 'FAIL'} on "
          f"emulated {cpu}, Debian {suite}, in {spent:.0f} s (log: {log})", flush=True)
    return ok, spent


def chain(suite: str, roots: Path, built: Path, cpus: list[str], first: bool,
          torch_free_too: bool, work: Path,
          others: tuple[tuple[str, Future[Path]], ...] = ()
          ) -> tuple[list[dict[str, object]], str]:
    """Everything on one Debian release: the install, each CPU's checks (and, on the `first`
    release, the folder run and the instruction counts), the `others` bundles (model name,
    bundle being built) on the last CPU and, with `torch_free_too`, the torch-free profile
    with its folder run. Returns the rows and the install's line."""
    root = roots / f"arm64-{suite}"
    bundle = work / f"bundle-{suite}"  # render signs in place: one copy per release
    shutil.copytree(built, bundle)
    ok, spent = install(root, bundle, cpus[0], suite)
    note = f"{suite} {'PASS' if ok else 'FAIL'} ({spent:.0f} s)"
    if not ok:
        return [{"suite": suite, "cpu": cpus[0], "ok": False,
                 "failure": "README install failed"}], note
    if suite == "bookworm":
        install_counter(root)
    try:
        print(f"prove_arm: {install_executorch(root, suite)}", flush=True)
    except RuntimeError as exc:
        return [{"suite": suite, "cpu": cpus[0], "ok": False, "failure": str(exc)}], note
    rows: list[dict[str, object]] = []
    for i, cpu in enumerate(cpus):
        fake_cpu_files(root, cpu)
        t1 = time.monotonic()
        with board_proc(root, cpu):
            row = prove(Board(root, cpu, f"/tmp/prove-{cpu}"), "/root/bundle", suite,
                        first=first and i == 0, folder=first and i == 0)
        row["wall_s"] = round(time.monotonic() - t1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    for model, future in others:
        try:
            other = future.result()
        except RuntimeError as exc:
            rows.append({"suite": suite, "cpu": cpus[-1], "ok": False, "model": model,
                         "failure": str(exc)})
            continue
        shutil.copytree(other, root / "root" / other.name, dirs_exist_ok=True)
        fake_cpu_files(root, cpus[-1])
        # SimpleCNN +fp32: the int8 files this board runs and each engine's fp32 file;
        # MobileNet and structured: TorchScript and ONNX Runtime proven, ExecuTorch's check
        # recorded (for MobileNet the board's XNNPACK kernels do not reproduce the host's
        # int8 logits, and the check refuses the file, as it must)
        engines, also = board_engines(cpus[-1], suite), ()
        if model == FP32_MODEL:
            engines += tuple(f"{e}-fp32" for e in engines if e != "torchscript")
        else:  # MobileNet, structured: ExecuTorch's check is recorded, not required
            engines, also = ENGINES, tuple(e for e in engines if e not in ENGINES)
        t1 = time.monotonic()
        with board_proc(root, cpus[-1]):
            row = prove_model(Board(root, cpus[-1], f"/tmp/prove-{other.name}-{cpus[-1]}"),
                              f"/root/{other.name}", suite, model, engines, also)
        row["wall_s"] = round(time.monotonic() - t1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if torch_free_too:
        t1 = time.monotonic()
        free = torch_free(root, bundle, cpus[-1], suite)
        free["wall_s"] = round(time.monotonic() - t1)
        rows.append(free)
        print(json.dumps(free), flush=True)
    return rows, note


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--roots", type=Path, default=ROOT / "build",
                   help="where the Debian roots are kept (arm64-<suite>)")
    p.add_argument("--cpus", default="cortex-a72,cortex-a76")
    p.add_argument("--suites", default="bookworm,trixie")
    p.add_argument("--nice", type=int, default=0,
                   help="niceness of the emulated part, after the bundle is built (CI: 10)")
    args = p.parse_args()
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="prove-arm-"))
    config = work / "arm.yaml"
    config.write_text(ARM_CONFIG)
    bundle = work / "bundle"
    built = subprocess.run([sys.executable, "-m", "optimizer", "run", "--data", "synthetic",
                            "--config", str(config), "--out", str(bundle)], cwd=ROOT,
                           capture_output=True, text=True)
    if built.returncode != 0:
        print(built.stderr, file=sys.stderr)
        return 1
    print(f"prove_arm: bundle built on the host in {time.monotonic() - t0:.0f} s", flush=True)
    if args.nice:
        # The emulated boards from here on, whose timings mean nothing, yield to the tests
        # beside them; the bundle above, which they wait for, did not.
        os.nice(args.nice)
    cpus, suites = args.cpus.split(","), args.suites.split(",")
    # The releases are independent boards (their own roots, brokers and bundle copies): each
    # runs its chain at once, mostly one qemu process apiece, so the slower release sets the
    # time instead of the sum of both.
    with ThreadPoolExecutor(max_workers=len(suites) + 3) as pool:
        # on the host, while the installs run
        others = ((MOBILENET_MODEL, pool.submit(build_mobilenet, work)),
                  (FP32_MODEL, pool.submit(build_fp32, config, bundle, work)),
                  (STRUCTURED_MODEL, pool.submit(build_structured, config, bundle, work)))
        futures = [pool.submit(chain, suite, args.roots, bundle, cpus, i == 0, i == 0, work,
                               others if i == 0 else ())
                   for i, suite in enumerate(suites)]
        done = [f.result() for f in futures]
    rows = [row for suite_rows, _ in done for row in suite_rows]
    print_tables(rows)
    print(f"prove_arm: README installs {', '.join(note for _, note in done)}; "
          f"{time.monotonic() - t0:.0f} s in all (emulated timings mean nothing)")
    return 0 if all(r["ok"] for r in rows) else 1


def print_tables(rows: list[dict[str, object]]) -> None:
    """One row per release and CPU, the torch-free row, then guest instructions per image."""
    def engine(r: dict[str, object], name: str) -> str:
        e = r.get(name)
        if isinstance(e, str):  # refused by the runtime matrix, or its check failed
            return "logits differ" if "logits differ" in e else "refused"
        if not isinstance(e, dict):
            return "-"
        return (f"{'exact' if e['bit_exact'] else 'DIFF'} {e['sample_accuracy_pct']:.2f}/"
                f"{e['host_pct']:.2f}")

    print(f"\n{'debian':<9} {'cpu':<11} {'model':<22} {'result':<6} "
          f"{'torchscript (acc board/host %)':>31} "
          f"{'onnxruntime (acc board/host %)':>31} {'executorch':>18} {'auto ran':>12} "
          f"{'folder = host':>13} "
          f"{'windows':>7} {'SIGTERM':>8} {'torch 2.10':>10} {'bad bundles':>11}")
    free: dict[str, object] = {}
    for r in rows:
        suite = f"{r['suite']}" + ("*" if r.get("profile") == "onnx" else "")
        free = r if r.get("profile") == "onnx" else free
        print(f"{suite:<9} {r['cpu']:<11} {str(r.get('model', 'SimpleCNN 32')):<22} "
              f"{'PASS' if r['ok'] else 'FAIL':<6} "
              f"{engine(r, 'torchscript'):>31} {engine(r, 'onnxruntime'):>31} "
              f"{engine(r, 'executorch'):>18} "
              f"{str(r.get('served_by', '-')):>12} "
              f"{str(r.get('folder_results', '-')).split(' ')[0]:>13} "
              f"{r.get('windows', '-'):>7} "
              f"{('exit ' + str(r['sigterm_exit'])) if 'sigterm_exit' in r else '-':>8} "
              f"{str(r.get('torch_2_10', '-')):>10} {str(r.get('bad_bundles', '-'))[:11]:>11}")
        if not r["ok"]:
            print(f"  FAIL: {r.get('failure')}")
    print("* the torch-free profile (install-agent.sh --profile onnx): import torch "
          f"{free.get('torch_import', '?')} on the board")
    for r in rows:
        if isinstance(r.get("bench"), str):
            print(f"\nedge-agent bench on {r['suite']} {r['cpu']}, "
                  f"{r.get('model', 'SimpleCNN 32')}"
                  + (" (torch-free)" if r.get("profile") == "onnx" else "")
                  + " (emulated: the timings mean nothing here)")
            print(r["bench"])
    counted = [r for r in rows if isinstance(r.get("insns_per_inference"), dict)]
    if counted:
        print("\nguest instructions per batch-1 inference (QEMU TCG plugin "
              "deploy/emulated-board/insn_count.c; a deterministic proxy, not cycles)")
        print(f"{'cpu':<11} {'model':<22} {'torchscript':>12} {'onnxruntime':>12} "
              f"{'executorch':>12} {'ort/ts':>6} {'et/ort':>6} {'onnxruntime-fp32':>16} "
              f"{'executorch-fp32':>16} {'fewest':>16} {'bench ran':>16}")
        for r in counted:
            n = r["insns_per_inference"]
            assert isinstance(n, dict)
            ts, ort, et, ort32, et32 = (n.get(e) for e in (
                "torchscript", "onnxruntime", "executorch", "onnxruntime-fp32",
                "executorch-fp32"))
            cells = [f"{c:,}" if c else "-" for c in (ts, ort, et, ort32, et32)]
            ratios = [f"{a / b:.2f}" if a and b else "-" for a, b in ((ort, ts), (et, ort))]
            print(f"{r['cpu']:<11} {str(r.get('model', 'SimpleCNN 32')):<22} "
                  f"{cells[0]:>12} {cells[1]:>12} {cells[2]:>12} {ratios[0]:>6} {ratios[1]:>6} "
                  f"{cells[3]:>16} {cells[4]:>16} {min(n, key=n.__getitem__):>16} "
                  f"{str(r.get('bench_runs', '-')):>16}")
        print("(bench ran: the file the agent's race chose by emulated time, which follows "
              "the count only roughly: QEMU's cost per instruction differs by kind)")
        for r in counted:
            if r.get("model") != STRUCTURED_MODEL:
                continue
            full = next((c for c in counted if c["cpu"] == r["cpu"] and "model" not in c
                         and c["suite"] == r["suite"]), None)
            if full is None:
                continue
            n, f = r["insns_per_inference"], full["insns_per_inference"]
            assert isinstance(n, dict) and isinstance(f, dict)
            print(f"structured 0.5 MACs / unpruned, guest instructions per image on "
                  f"{r['cpu']}: " + ", ".join(f"{e} {n[e] / f[e]:.2f}" for e in n if f.get(e)))


if __name__ == "__main__":
    raise SystemExit(main())
