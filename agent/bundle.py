"""A verified bundle on the board: its model files checked once, then loaded fresh on demand.

`Bundle.open` reads the manifest and every engine's model file and checks their sha256s;
every runner is loaded from those verified bytes, so a file cannot change between check and
load. `check` proves each engine on this board on a runner of its own (one inference at the
manifest's input shape, then the bundled sample reproducing that engine's host logits and
accuracy), and with `engine: auto` times the proven ones and picks the fastest: TorchScript
specialises a module on the first input shapes it runs, so the inference loop gets a fresh
runner (`load`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import engines, first_load
from agent.engines import TORCHSCRIPT, Runner
from agent.engines.executorch import check_header
from agent.errors import BundleError
from agent.manifest import MANIFEST, Manifest, embedded_metadata, manifest_bytes
from agent.preprocess import normalize
from agent.signing import MAX_SIGNATURE_BYTES, SIGNATURE_FILE, Signature, verify
from agent.timing import race
from agent.untrusted import Untrusted, read_regular

RACE_ROUNDS, RACE_PASSES = 7, 15  # engine: auto's timing, interleaved rounds per engine


@dataclass(frozen=True)
class Bundle:
    dir: Path
    manifest: Manifest
    model_path: Path  # the TorchScript board model: the bundle's identity
    files: dict[str, bytes]  # each model file's verified bytes, by its name (agent/engines)
    signature: Signature | None = None

    @property
    def sha256(self) -> str:
        return str(self.manifest.files[self.manifest.board_model]["sha256"])

    @property
    def engines(self) -> list[str]:
        """The model files this bundle carries that this agent knows, by name (an engine, or
        `<engine>-fp32`), TorchScript first."""
        return list(self.files)

    @classmethod
    def open(cls, directory: Path,
             public_key: Ed25519PublicKey | tuple[Ed25519PublicKey, ...] | None = None
             ) -> Bundle:
        """Read the manifest and every engine's sha256-verified model file of `directory`.

        With `public_key` (or a tuple of trusted keys), the manifest must carry a valid
        signature by that key (one of them) first.

        Raises:
            BundleError: no manifest, a file missing or changed, or an unusable manifest.
        """
        raw = manifest_bytes(directory)
        signature = None
        if public_key is not None:
            sig_path = directory / SIGNATURE_FILE
            try:
                sig = read_regular(sig_path, MAX_SIGNATURE_BYTES, SIGNATURE_FILE) \
                    if sig_path.exists() else None
            except (OSError, Untrusted) as exc:
                raise BundleError(f"{sig_path}: unreadable ({exc})") from None
            signature = verify(raw, sig, public_key, str(directory))
        # Parsed from the bytes just verified: nothing can change between check and use.
        manifest = Manifest.parse(raw, str(directory / MANIFEST))
        files = {name: manifest.verified_bytes(directory, str(entry["file"]))
                 for name, entry in manifest.engine_entries.items()}
        if not any(e["file"] == manifest.board_model for e in manifest.engine_entries.values()):
            manifest.verified_bytes(directory, manifest.board_model)  # the bundle's identity
        if TORCHSCRIPT in files:
            _agrees_with_model(manifest, directory / manifest.engine_entries[TORCHSCRIPT]
                               ["file"], files[TORCHSCRIPT])
        return cls(directory, manifest, directory / manifest.board_model, files, signature)

    def path_of(self, engine: str) -> Path:
        return self.dir / str(self.manifest.engine_entries[engine]["file"])

    def load(self, engine: str, threads: int = 1) -> Runner:
        """A freshly loaded runner of the bundle's file `engine` (an engine, or
        `<engine>-fp32`) on `threads` threads.

        Raises:
            BundleError: the bundle has no such engine, its runtime is missing, or the file
                does not load.
        """
        if engine not in self.files:
            raise BundleError(f"{self.dir}: the bundle has no {engine} model (it has "
                              f"{', '.join(self.files)}): set model.engine to auto or one of "
                              f"those, or rebuild the bundle with edge-optimize")
        m = self.manifest
        return engines.load(engine, self.files[engine], self.path_of(engine),
                            m.engine_entries[engine], threads,
                            {"input_shape": m.input_shape, "classes": m.classes})

    def check_loads(self) -> list[str]:
        """Check that every model file loads: an ExecuTorch program's header always, and each
        file whose runtime is installed here loaded and run once in a child process
        (agent/first_load.py; once per file and runtime release on this machine; the sample's
        logits are the board's to compare). Returns the files not loaded for want of their
        runtime.

        Raises:
            BundleError: a file does not load (for `edge-deploy sign`: never sign it).
        """
        unchecked = []
        for name, data in self.files.items():
            runtime = engines.engine_of(name)
            if runtime == "executorch":
                check_header(data, self.path_of(name))
            version = engines.installed(runtime)
            if version is None:
                unchecked.append(name)
            else:
                first_load.prove_once(self.dir, name, data, runtime, version, 1, load_only=True)
        return unchecked

    def sample(self) -> dict[str, Any]:
        """The verified labelled sample: uint8 images, labels, each engine's host logits."""
        return self.manifest.load_sample(self.dir)

    def prove(self, engine: str, sample: dict[str, Any], threads: int = 1) -> dict[str, Any]:
        """Prove one engine on this board: one inference at the input shape, then the
        sample's logits against the host's (within the engine's tolerance) and its accuracy.

        Raises:
            BundleError: anything that means this board must not run this engine.
        """
        return self._prove(engine, sample, threads)[0]

    def _prove(self, engine: str, sample: dict[str, Any], threads: int
               ) -> tuple[dict[str, Any], Runner]:
        """prove(), and the runner it proved. A file not yet proven on this machine with this
        runtime release is proven in a child process first (agent/first_load.py): a file
        that kills its runtime costs the child, not this process."""
        runtime = engines.engine_of(engine)
        proof = first_load.prove_once(self.dir, engine, self.files[engine], runtime,
                                      engines.installed(runtime) or "unknown", threads)
        if proof is not None:
            return proof, self.load(engine, threads)
        return self.prove_here(engine, sample, threads)

    def load_and_run_once(self, engine: str, threads: int = 1) -> tuple[Runner, float]:
        """The file `engine` loaded and run once on a zero image at the manifest's input
        shape; (runner, load time in ms).

        Raises:
            BundleError: it does not load, does not take the input shape, or gives another
                output shape than the manifest's classes.
        """
        m, path = self.manifest, self.path_of(engine)
        t0 = time.perf_counter()
        runner = self.load(engine, threads)
        load_ms = (time.perf_counter() - t0) * 1000
        shape = m.input_shape
        with runner.session():
            try:
                out = np.asarray(runner(np.zeros((1, *shape), dtype=np.float32)))
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0]
                raise BundleError(f"{path}: one inference on input [1, "
                                  f"{', '.join(map(str, shape))}] failed ({first}): the model "
                                  f"does not take the manifest's input shape") from None
        if tuple(out.shape) != (1, len(m.classes)):
            raise BundleError(f"{path}: output shape {tuple(out.shape)}, the manifest "
                              f"expects (1, {len(m.classes)})")
        return runner, load_ms

    def prove_here(self, engine: str, sample: dict[str, Any], threads: int
                   ) -> tuple[dict[str, Any], Runner]:
        """prove() in this process, and the runner it proved."""
        m, path = self.manifest, self.path_of(engine)
        entry = m.engine_entries[engine]
        runner, load_ms = self.load_and_run_once(engine, threads)
        with runner.session():
            logits = np.asarray(runner(normalize(sample["images"], m.mean, m.std)))
        host = sample["logits"][str(entry["sample_logits"])]
        diff = float(np.abs(logits - host).max())
        tolerance = float(entry["logit_tolerance"])
        accuracy = 100.0 * float((logits.argmax(1) == sample["labels"]).mean())
        if diff > tolerance:
            raise BundleError(f"{path}: this board's {engine} logits differ from the host's by "
                              f"up to {diff:.3g} (> {tolerance}) on the bundled sample: do not "
                              f"run it here")
        if abs(accuracy - float(entry["sample_accuracy_pct"])) > 1e-6:
            raise BundleError(f"{path}: {engine} sample accuracy {accuracy:.2f}% here, "
                              f"{float(entry['sample_accuracy_pct']):.2f}% on the host")
        return {"engine": engine, "version": runner.version, "status": "proven",
                "max_abs_logit_diff": diff, "bit_exact": diff == 0.0,
                "sample_accuracy_pct": accuracy, "load_ms": load_ms}, runner

    def check(self, engine: str = "auto", batch_size: int = 1, threads: int = 1,
              every: bool = False) -> dict[str, Any]:
        """Prove the bundle's engines on this board and choose the one to run.

        `engine` is auto (the fastest proven engine, timed here at `batch_size` and
        `threads`) or an engine's name (that one, which must pass). With `every`, engines
        that will not run are proven too (`edge-agent check` and `bench` show them all).

        Raises:
            BundleError: the chosen engine (or, for auto, every engine) failed or is missing.
        """
        return self.choose(engine, batch_size, threads, every)[0]

    def choose(self, engine: str = "auto", batch_size: int = 1, threads: int = 1,
               every: bool = False) -> tuple[dict[str, Any], Runner]:
        """check(), and the chosen engine's runner, proven (and raced, for auto) on
        `threads` threads: what the loop runs, without loading the model again (an ONNX
        Runtime session costs 40 ms of a 0.5 s cold start here).

        Raises:
            BundleError: as check().
        """
        m = self.manifest
        runners: dict[str, Runner] = {}
        if engine != "auto" and engine not in self.files:
            self.load(engine)  # raises: not in the bundle
        sample = self.sample()
        rows: list[dict[str, Any]] = []
        for name in self.files:
            version = engines.installed(engines.engine_of(name))
            row: dict[str, Any] = {"engine": name, "version": version,
                                   "precision": _precision(m, name)}
            if version is None:
                row.update(status="not installed", detail=f"pip install "
                           f"{engines.RUNTIMES[engines.engine_of(name)]} to run it")
            elif engine not in ("auto", name) and not every:
                row.update(status="not tried", detail=f"model.engine is {engine}")
            else:
                try:
                    proof, runners[name] = self._prove(name, sample, threads)
                    row.update(proof)
                except BundleError as exc:
                    row.update(status="failed", detail=str(exc))
            rows.append(row)
        proven = [r for r in rows if r["status"] == "proven"]
        wanted = [r for r in proven if engine in ("auto", r["engine"])]
        if not wanted:
            why = "; ".join(f"{r['engine']}: {r['status']}" + (f" ({r['detail']})"
                                                                 if "detail" in r else "")
                            for r in rows)
            raise BundleError(f"{self.dir}: no engine passed its proof on this board ({why})"
                              if engine == "auto" else
                              f"{self.dir}: engine {engine} cannot run on this board ({why})")
        if engine != "auto":
            chosen, reason = wanted[0], f"model.engine is {engine}"
        elif len(wanted) == 1:
            chosen = wanted[0]
            others = [f"{r['engine']} {r['status']}" for r in rows if r is not chosen]
            reason = "the only proven engine" + (f" ({', '.join(others)})" if others else "")
        else:
            # Fresh runners, timed as the loop will run them (a proven TorchScript module
            # has run the sample's batch too); the winner's is the one returned.
            runners = {r["engine"]: self.load(r["engine"], threads) for r in wanted}
            timed = race(runners, [np.zeros((batch_size, *m.input_shape), dtype=np.float32)],
                         RACE_ROUNDS, RACE_PASSES)
            for r in wanted:
                r["p50_ms"] = timed[r["engine"]].p50_s * 1000
            wanted.sort(key=lambda r: r["p50_ms"])
            chosen, runner_up = wanted[0], wanted[1]
            reason = (f"fastest proven: p50 {chosen['p50_ms']:.3f} ms against "
                      f"{runner_up['engine']} {runner_up['p50_ms']:.3f} ms "
                      f"({chosen['p50_ms'] / runner_up['p50_ms']:.2f}x), batch {batch_size}, "
                      f"{threads} thread(s)")
        return {"bundle": str(self.dir), "mode": m.quantization["mode"],
                "engine": chosen["engine"], "engine_version": chosen["version"],
                "precision": chosen["precision"],
                "quantized_engine": m.engine, "choice": engine, "reason": reason,
                "sample_images": int(sample["labels"].shape[0]),
                "max_abs_logit_diff": chosen["max_abs_logit_diff"],
                "bit_exact": chosen["bit_exact"],
                "sample_accuracy_pct": chosen["sample_accuracy_pct"], "engines": rows
                }, runners[chosen["engine"]]


def _precision(m: Manifest, name: str) -> str:
    """int8 or fp32: what the bundle's file `name` computes in (the TorchScript file of a
    bundle whose quantization fell back to fp32 is fp32)."""
    entry = m.engine_entries[name]
    if "precision" in entry:
        return str(entry["precision"])
    return {"fp32": "fp32", "dynamic": "int8 weights"}.get(str(m.quantization.get("mode")),
                                                           "int8")


def describe(checked: dict[str, Any]) -> str:
    """The check's choice in one line: engine, version and why."""
    what = checked["mode"] if checked.get("precision") != "fp32" else "its fp32 file"
    return f"{checked['engine']} {checked['engine_version']} ({checked['reason']}; {what})"


def _agrees_with_model(manifest: Manifest, path: Path, data: bytes) -> None:
    """Check the manifest against the metadata export embedded in the TorchScript model,
    before any run.

    This is the input-shape check: a quantized qnnpack Linear does not check its input's
    width, so a wrong shape is never fed to the model to find out (measured on torch 2.13: a
    [1, 3, 64, 64] input into the 32x32 SimpleCNN returned garbage, corrupted the module's
    later results and crashed a second module in the same process).
    """
    try:
        meta = embedded_metadata(data)
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from None
    if meta is None:
        raise BundleError(f"{path}: no embedded edgeforge metadata (rebuild the bundle with "
                          f"edge-optimize export)")
    for key, ours in (("input_shape", manifest.input_shape), ("engine", manifest.engine),
                      ("classes", manifest.classes)):
        if key in meta and meta[key] != ours:
            raise BundleError(f"{path}: the manifest's {key.replace('_', ' ')} {ours} does not "
                              f"match the model's {meta[key]}: the model does not take the "
                              f"manifest's input shape or labels (rebuild the bundle; the model "
                              f"was not run)")
