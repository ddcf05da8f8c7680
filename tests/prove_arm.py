"""The ARM proof: the emulated Raspberry Pi 4 and Pi 5 run the bundle this run built.

    .venv/bin/python -m tests.prove_arm [--root build/arm64-board] [--cpus cortex-a72,cortex-a76]

1. builds a qnnpack bundle on this x86 host with `edge-optimize run --data synthetic`
   (ARM_CONFIG, about 30 s);
2. installs the agent the way the README tells a Pi owner to, on the first CPU:
   deploy/emulated-board/install-board.sh runs `edge-deploy render` here and the folder's
   `install-agent.sh` as written inside a Debian bookworm arm64 chroot (qemu-aarch64 through
   binfmt_misc; the root is kept between runs), which installs the torch matrix's torch from
   PyPI and the agent alone, and activates the signed bundle (the on-board check included);
3. for each CPU, with QEMU_CPU set (the default `max` CPU, with 512-bit SVE, gave wrong fp32
   results) and a fake /proc/cpuinfo and /sys cpu list for 4 cores of that model, runs the
   installed agent (/opt/edgeforge/venv) in the chroot:
   - `python -m agent.torch_matrix status` judges the board's torch "ok" against the matrix;
   - on the first CPU, `edge-agent check` with the installed /etc/edgeforge/config.yaml
     passes on the store's current version, its signature checked with the fleet's key;
   - on the first CPU, a bundle for the x86 engine and a manifest from a newer schema are
     each refused by `edge-agent check` in one line;
   - with torch 2.10.0's metadata faked in front of the real torch, `edge-agent check`
     refuses it in one line on the Cortex-A72 (no ARMv8.1 atomics) and only warns on the
     Cortex-A76;
   - `edge-agent check` passes: sha256, engine, embedded metadata, the bundled sample
     reproducing the host's logits (bit-exact for static int8) and accuracy;
   - `edge-agent run` with a `folder` source classifies FOLDER_IMAGES PNG files of the
     stand-in test images dropped into a folder (the installer's default `images` extra:
     Pillow and watchdog from PyPI's aarch64 wheels); every result's top-3 labels and
     scores equal the host's for the same file, exactly; it publishes at least 3 telemetry
     windows to a real mosquitto on the host's loopback (a chroot shares the host network)
     and exits 0 on SIGTERM, after publishing `offline`.
Prints one row per CPU and exits 1 if any check fails. Timings under emulation mean nothing
and are not reported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support import ROOT, bundle_config
from tests.support.broker import Broker, Subscriber
from tests.support.media import host_top, png_bytes, results, sample_images, write_pngs

# Enough training that "the same top-1 accuracy as the host" means something (well above the
# 10 % of chance), and short, because it runs beside the tests on CI's critical path.
ARM_CONFIG = bundle_config(10000, 2, 0.001, 32)

FOLDER_IMAGES = 16  # PNG files the emulated board classifies

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
    """A bundle for an engine this board lacks, and a newer manifest: one line, exit 2."""
    cases = {"x86 engine": ({"engine": "x86"}, "quantized engine 'x86' is not available"),
             "newer schema": ({"schema": "edgeforge.bundle/9"}, "newer than this agent")}
    for name, (changes, needle) in cases.items():
        copy = f"{board.workdir}/bundle-{name.replace(' ', '-')}"
        shutil.copytree(board.host(bundle), board.host(copy))
        manifest = json.loads((board.host(copy) / "manifest.json").read_text())
        manifest.update(changes)
        (board.host(copy) / "manifest.json").write_text(json.dumps(manifest))
        proc = board.agent("check", "--set", f"model.dir={copy}")
        lines = proc.stderr.strip().splitlines()
        if proc.returncode != 2 or len(lines) != 1 or needle not in lines[0]:
            return f"{name}: exit {proc.returncode}, stderr {proc.stderr[-300:]!r}"
    return None


def prove(board: Board, bundle: str, bad_inputs: bool) -> dict[str, object]:
    row: dict[str, object] = {"cpu": board.cpu, "ok": False}
    status = board.run("-m", "agent.torch_matrix", "status")
    row["runtime"] = status.stdout.strip() or status.stderr.strip()
    if status.returncode != 0 or not status.stdout.startswith("ok:"):
        row["failure"] = f"runtime status: {row['runtime']}"
        return row
    # A fake of an installed torch 2.10.0 (its metadata only; no such build can run here).
    fake = f"{board.workdir}/fake-torch-2.10"
    (board.host(fake) / "torch-2.10.0.dist-info").mkdir(parents=True)
    (board.host(fake) / "torch-2.10.0.dist-info/METADATA").write_text(
        "Metadata-Version: 2.1\nName: torch\nVersion: 2.10.0\n")
    bad = board.agent("check", "--set", f"model.dir={bundle}", pythonpath=fake)
    lines = bad.stderr.strip().splitlines()
    if "atomics" in CPUS[board.cpu][4]:
        row["torch_2_10"] = "warned" if bad.returncode == 0 and any(
            "not proven here" in line for line in lines) else f"exit {bad.returncode}"
        expected = "warned"
    else:
        row["torch_2_10"] = "refused" if bad.returncode == 2 and len(lines) == 1 and \
            "known to fail" in lines[0] and "torch==2.9.1" in lines[0] else \
            f"exit {bad.returncode}: {bad.stderr[-300:]}"
        expected = "refused"
    if row["torch_2_10"] != expected:
        row["failure"] = (f"torch 2.10.0 on {board.cpu}: expected {expected}, got "
                          f"{row['torch_2_10']}")
        return row
    if bad_inputs:
        # What the installer left, as the service will run it: the board's own config, the
        # store's current version, its signature checked with the fleet's public key.
        installed = board.run("-m", "agent", "check")
        row["installed_check"] = "pass" if installed.returncode == 0 else \
            f"exit {installed.returncode}: {installed.stderr[-300:]}"
        if installed.returncode != 0:
            row["failure"] = f"edge-agent check of the install: {row['installed_check']}"
            return row
        problem = refuses_bad_bundles(board, bundle)
        row["bad_bundles"] = "refused" if problem is None else problem
        if problem is not None:
            row["failure"] = f"bad bundle not refused in one line: {problem}"
            return row
    check = board.agent("check", "--set", f"model.dir={bundle}")
    row["check"] = (check.stdout.strip() or check.stderr.strip())[-300:]
    if check.returncode != 0 or check.stderr.strip():
        row["failure"] = f"edge-agent check (exit {check.returncode}): {check.stderr.strip()}"
        return row
    diff = re.search(r"max \|logit diff\| ([0-9.eE+-]+), accuracy ([0-9.]+)%", check.stdout)
    manifest = json.loads((board.host(bundle) / "manifest.json").read_text())
    assert diff, check.stdout
    row["max_abs_logit_diff"] = float(diff.group(1))
    row["sample_accuracy_pct"] = float(diff.group(2))
    row["host_sample_accuracy_pct"] = float(manifest["sample"]["accuracy_pct"])
    bit_exact_expected = manifest["quantization"]["mode"].startswith("static")
    if bit_exact_expected and row["max_abs_logit_diff"] != 0.0:
        row["failure"] = "static int8 logits are not bit-exact to the host's"
        return row

    # Real work: PNG files of the stand-in test images dropped into a folder the agent
    # watches; each result must carry the host's top-k labels and scores, exactly.
    inbox = f"{board.workdir}/inbox"
    names = write_pngs(board.host(bundle), board.host(inbox), FOLDER_IMAGES)
    images, _ = sample_images(board.host(bundle))
    expected = dict(zip(names, host_top(board.host(bundle), [
        png_bytes(images[i % images.shape[0]]) for i in range(FOLDER_IMAGES)]), strict=True))
    broker = Broker(board.host(board.workdir) / "broker")
    broker.start()
    sub = Subscriber(broker.port, client_id=f"prove-{board.cpu}")
    agent = board.start("-m", "agent", "run", "--config", board.config,
                        "--set", f"model.dir={bundle}",
                        "--set", "mqtt.host=127.0.0.1", "--set", f"mqtt.port={broker.port}",
                        "--set", f"device.id=emulated-{board.cpu}", "--set", "loop.window_s=2",
                        "--set", "source.kind=folder", "--set", f"source.path={inbox}",
                        "--set", "source.poll_s=0.5", "--set", "loop.warmup=2",
                        "--set", f"spool.path={board.workdir}/spool.db")
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
        row["failure"] = str(exc)
        return row
    finally:
        if agent.poll() is None:
            agent.kill()
        log = agent.stdout.read() if agent.stdout else ""
        agent.wait()
        sub.close()
        broker.stop()
        (board.host(board.workdir) / "agent.log").write_text(log)
        if "failure" in row:
            row["failure"] = f"{row['failure']}; agent log: {log[-800:]}"
    telemetry = sub.telemetry()
    row["windows"] = len(telemetry)
    got = results(sub.on("/result"))
    same = [r["source_id"] for r in got if r["top"] == expected.get(r["source_id"])]
    row["folder_results"] = f"{len(same)}/{FOLDER_IMAGES} equal to the host's"
    if sorted(same) != sorted(names) or len(got) != FOLDER_IMAGES:
        differ = [(r["source_id"], r["top"], expected.get(r["source_id"])) for r in got
                  if r["top"] != expected.get(r["source_id"])]
        row["failure"] = (f"folder source: {row['folder_results']}, {len(got)} result(s); "
                          f"board, host: {differ[:3]}")
        return row
    if row["sigterm_exit"] != 0:
        row["failure"] = f"SIGTERM exit {row['sigterm_exit']}: {log[-1000:]}"
        return row
    row["ok"] = True
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, default=ROOT / "build/arm64-board")
    p.add_argument("--cpus", default="cortex-a72,cortex-a76")
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
    cpus = args.cpus.split(",")
    t1 = time.monotonic()
    installed = subprocess.run(["bash", str(ROOT / "deploy/emulated-board/install-board.sh"),
                                str(bundle), cpus[0], str(args.root)], cwd=ROOT).returncode == 0
    install_s = time.monotonic() - t1
    print(f"prove_arm: README install {'PASS' if installed else 'FAIL'} on emulated {cpus[0]} "
          f"in {install_s:.0f} s", flush=True)
    if not installed:
        return 1
    rows = []
    for cpu in cpus:
        fake_cpu_files(args.root, cpu)
        t1 = time.monotonic()
        with board_proc(args.root, cpu):
            row = prove(Board(args.root, cpu, f"/tmp/prove-{cpu}"), "/root/bundle",
                        bad_inputs=not rows)
        row["wall_s"] = round(time.monotonic() - t1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'cpu':<11} {'result':<6} {'max|dlogit|':>11} {'acc board/host %':>17} "
          f"{'folder = host':>13} {'windows':>7} {'SIGTERM':>8} {'torch 2.10':>10} "
          f"{'bad bundles':>11}  torch")
    for r in rows:
        acc = (f"{r.get('sample_accuracy_pct', float('nan')):.2f}/"
               f"{r.get('host_sample_accuracy_pct', float('nan')):.2f}")
        print(f"{r['cpu']:<11} {'PASS' if r['ok'] else 'FAIL':<6} "
              f"{r.get('max_abs_logit_diff', float('nan')):>11.3g} {acc:>17} "
              f"{str(r.get('folder_results', '-')).split(' ')[0]:>13} "
              f"{r.get('windows', 0):>7} {('exit ' + str(r.get('sigterm_exit'))):>8} "
              f"{str(r.get('torch_2_10', '-')):>10} {str(r.get('bad_bundles', '-'))[:11]:>11}  "
              f"{str(r.get('runtime', ''))[:70]}")
        if not r["ok"]:
            print(f"  FAIL: {r.get('failure')}")
    print(f"prove_arm: README install on {cpus[0]} PASS ({install_s:.0f} s); "
          f"{time.monotonic() - t0:.0f} s in all (emulated timings mean nothing)")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
