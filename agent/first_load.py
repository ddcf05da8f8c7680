"""The first load of each engine file on a machine happens in a child process.

A runtime can kill the process that loads a bad file instead of raising: ExecuTorch's
aborts (SIGABRT) on some malformed programs, and a native library can crash on a crafted
model. In the agent that would be an exit with no line of its own, and under systemd a
restart loop. So each model file is proven first in a child process (`python -m
agent.first_load`: the whole proof, one inference and the bundled sample, as `Bundle.prove`
runs it), and only a file that came through is loaded in the agent. A child that dies is
one BundleError naming the signal and the runtime's own last log line; the board runs
another proven engine.

A file proven this way is remembered by its sha256, runtime and version in the cache folder
($CACHE_DIRECTORY, which systemd's CacheDirectory= sets; else $XDG_CACHE_HOME/edgeforge or
~/.cache/edgeforge), so later starts prove it in the agent's own process. An unwritable
cache only costs the child again.

    python -m agent.first_load <bundle dir> <engine> <threads> <sha256> [--load-only]
        prints the proof as one JSON line and exits 0, or prints a BundleError's message and
        exits 2; a runtime that kills the process ends it by that signal. --load-only: load
        the file and run one inference, without the sample's logits.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from agent.engines.executorch import RAW_LOG_ENV
from agent.engines.executorch import RUNTIME_LOG as RUNTIME_LINE
from agent.errors import BundleError

CHILD_TIMEOUT_S = 600.0  # a Pi 4 imports torch and runs the sample in well under this


def cache_dir() -> Path:
    """Where proven files are remembered."""
    if os.environ.get("CACHE_DIRECTORY"):
        return Path(os.environ["CACHE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgeforge"


def _marker(sha256: str, runtime: str, version: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._+-]", "_", f"{runtime}-{version}")
    return cache_dir() / "proven" / f"{sha256}.{safe}"


def proven_before(sha256: str, runtime: str, version: str) -> bool:
    """Whether this file loaded in a child on this machine with this runtime release."""
    return _marker(sha256, runtime, version).is_file()


def remember(sha256: str, runtime: str, version: str) -> None:
    """Mark the file proven (best effort: an unwritable cache costs the child next time)."""
    path = _marker(sha256, runtime, version)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError:
        pass


def prove_once(directory: Path, engine: str, data: bytes, runtime: str, version: str,
               threads: int, load_only: bool = False) -> dict[str, Any] | None:
    """`prove_in_child` the first time this file meets this runtime release on this machine
    (remembered once it comes through); None when it already has.

    Raises:
        BundleError: as prove_in_child.
    """
    sha = hashlib.sha256(data).hexdigest()
    if proven_before(sha, runtime, version):
        return None
    proof = prove_in_child(directory, engine, threads, sha, load_only=load_only)
    remember(sha, runtime, version)
    return proof


def prove_in_child(directory: Path, engine: str, threads: int, sha256: str,
                   timeout_s: float = CHILD_TIMEOUT_S, load_only: bool = False
                   ) -> dict[str, Any]:
    """`Bundle.prove(engine)` run in a child process; its proof row. With `load_only`, the
    child loads the file and runs one inference at the input shape, without comparing the
    sample's logits (`edge-deploy sign` on a machine other than the board or the host).

    Raises:
        BundleError: the proof failed (the child's own message), or the runtime killed the
            child (the signal and the runtime's last log line), or it did not finish.
    """
    argv = [sys.executable, "-m", "agent.first_load", str(directory), engine, str(threads),
            sha256, *(["--load-only"] if load_only else [])]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                              timeout=timeout_s, env={**os.environ, RAW_LOG_ENV: "1"})
    except subprocess.TimeoutExpired:
        raise BundleError(f"{directory}: proving {engine} did not finish in {timeout_s:g} s "
                          f"(in a child process); not run here") from None
    out = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and out:
        try:
            proof = json.loads(out[-1])
        except ValueError:
            proof = None
        if isinstance(proof, dict) and proof.get("status") in ("proven", "loaded"):
            return proof
    raise child_failure(proc, directory, engine)


def child_failure(proc: subprocess.CompletedProcess[str], directory: Path,
                  engine: str) -> BundleError:
    """The one-line error for a child proof that failed, was killed, or said nothing."""
    out = proc.stdout.strip().splitlines()
    if proc.returncode == 2 and out:
        return BundleError(out[-1])
    said = [RUNTIME_LINE.sub("", line) for line in proc.stderr.splitlines()
            if RUNTIME_LINE.match(line)]
    if proc.returncode < 0:
        try:
            how = signal.Signals(-proc.returncode).name
        except ValueError:
            how = f"signal {-proc.returncode}"
        what = f"loading it killed the {engine} runtime's process ({how})"
    else:
        what = f"its proof ended with exit {proc.returncode}"
    last = said[-1] if said else (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return BundleError(f"{directory}: {engine}: {what}; the runtime said: {last[:300]} (the "
                       f"file is refused; rebuild the bundle with an edge-optimize whose "
                       f"runtime matches this board's)")


def main(argv: list[str]) -> int:
    from agent.bundle import Bundle

    directory, engine, threads, sha256 = Path(argv[0]), argv[1], int(argv[2]), argv[3]
    try:
        bundle = Bundle.open(directory)
        if engine not in bundle.files or \
                hashlib.sha256(bundle.files[engine]).hexdigest() != sha256:
            raise BundleError(f"{directory}: the {engine} file changed while it was proven "
                              f"(copy the bundle again)")
        if "--load-only" in argv[4:]:
            bundle.load_and_run_once(engine, threads)
            proof = {"engine": engine, "status": "loaded"}
        else:
            proof = bundle.prove_here(engine, bundle.sample(), threads)[0]
    except BundleError as exc:
        print(str(exc).replace("\n", " "))
        return 2
    print(json.dumps(proof))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
