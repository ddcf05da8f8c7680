"""Remote commands and signed model updates, answered on `<prefix>/<id>/cmd_result`.

A command arrives on `<prefix>/<id>/cmd/<name>` as {"request_id": "...", "schema":
"edgeforge.cmd/1", "args": {...}} (request_id first, so even a truncated or oversized
payload can be answered). Names: `update_model`, `rollback`, `set`, `benchmark`,
`diagnostics`. Every command gets one result, {"request_id", "command", "ok", "result",
"code", "reason", "data"}; an update that goes live gets a second one when its trial ends
("confirmed" or "rolled_back").

One worker thread does the work and owns its state (the store, the running bundle, the
trial): paho's callback only queues the payload in the worker's `CommandInbox`, and the
inference loop only takes, through its `LoopControl`, a module that is already loaded,
checked and warmed up. Nothing here takes a lock the loop needs: verifying, staging and the
smoke test run while the loop goes on. After a switch
the loop runs the old module beside the new one on every input (the shadow), and the worker
watches the next `update.watch_windows` windows: a forward-pass error, a latency regression
(agent/regression.py: the paired latencies, Mann-Whitney, median first and p99 second), or a
sample accuracy more than `max_accuracy_drop_pct` below the manifest's rolls back by itself.
If the agent dies during a trial, the next start rolls back before loading anything
(`recover_trial`, agent/store.py).

Every update ends in exactly one final answer, whatever breaks: an exception nobody foresaw
is answered as `failed` with code `internal`, the staged folder is removed, and the refusal
is listed under `rejected` in `diagnostics`. The inbox is bounded: a command that finds it
full is refused at once (`busy`, agent/command_inbox.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from cryptography.exceptions import InvalidSignature

import agent
from agent.bench import bench, table
from agent.bundle import Bundle
from agent.command_auth import Nonces, authorize
from agent.command_inbox import REQUEST_ID, CommandInbox
from agent.config import AgentConfig, Invalid, LoopConfig, UpdateConfig, loop_changes
from agent.engines import ENGINES, installed
from agent.errors import EdgeforgeError, Refused
from agent.fleet_key import FleetKey, parse_public_key, rotation_statement
from agent.loop import LoopControl, Model, warm_up
from agent.publisher import CommandResult, ModelChange
from agent.regression import Verdict, compare
from agent.signing import key_id
from agent.store import Store
from agent.telemetry import CMD_SCHEMA, COMMANDS, Window
from agent.untrusted import Untrusted, loads_json
from agent.update import decode_files, smoke_test, verify_release

log = logging.getLogger(__name__)

MIN_PASSES = 10  # a window with fewer forward passes says nothing about latency
STALL_S = 600.0  # one command busy for longer than this: the worker is stuck
MAX_BENCH_IMAGES = 100_000  # a benchmark's iters x sum(batch_sizes)


class RecentErrors(logging.Handler):
    """The last warnings and errors the agent logged, for `diagnostics`."""

    def __init__(self, capacity: int = 20) -> None:
        super().__init__(logging.WARNING)
        self.lines: deque[str] = deque(maxlen=capacity)

    def emit(self, record: logging.LogRecord) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
        self.lines.append(f"{stamp} {record.levelname} {record.getMessage()}")


def parse_request(payload: bytes, max_bytes: int) -> tuple[str, dict[str, Any], Any]:
    """(request_id, args, auth) of a command payload (auth unchecked: command_auth does).

    Raises:
        Refused: too_large or malformed; `request_id` of the exception is what could be read.
    """
    head = REQUEST_ID.search(payload[:512])
    rid = head.group(1).decode() if head else None
    if len(payload) > max_bytes:
        raise Refused("too_large", f"payload of {len(payload):,} bytes is over "
                      f"update.max_payload_mb ({max_bytes:,} bytes)", request_id=rid)
    try:
        msg = loads_json(payload, "payload", max_bytes)
    except Untrusted as exc:
        raise Refused("malformed", f"{exc} (truncated?)", request_id=rid) from None
    if not isinstance(msg, dict):
        raise Refused("malformed", "payload is not a JSON object", request_id=rid)
    rid = msg.get("request_id")
    if not isinstance(rid, str) or not REQUEST_ID.fullmatch(
            f'"request_id":"{rid}"'.encode()):
        raise Refused("malformed", "request_id must be a string of 1-64 letters, digits or "
                      "._:-")
    if msg.get("schema", CMD_SCHEMA) != CMD_SCHEMA:
        raise Refused("malformed", f"schema {msg.get('schema')!r}, expected {CMD_SCHEMA}",
                      request_id=rid)
    args = msg.get("args", {})
    if not isinstance(args, dict):
        raise Refused("malformed", "args must be a JSON object", request_id=rid)
    return rid, args, msg.get("auth")


@dataclass
class Trial:
    """A version just switched to, watched for `watch_windows` windows."""

    request_id: str | None
    vid: str
    sha256: str
    from_vid: str | None
    previous: Model
    previous_bundle: Bundle
    previous_checked: dict[str, Any]
    expected_accuracy_pct: float | None
    windows: int = 0
    new_s: array = field(default_factory=lambda: array("d"))  # paired pass latencies
    old_s: array = field(default_factory=lambda: array("d"))
    correct: int = 0
    labelled: int = 0


class Commands(threading.Thread):
    """The worker that runs commands and watches trials; see the module docstring."""

    def __init__(self, cfg: UpdateConfig, loop_cfg: LoopConfig, store: Store | None,
                 keys: FleetKey, submit: Callable[[Any], bool],
                 bundle: Bundle, checked: dict[str, Any], model: Model, inbox: CommandInbox,
                 control: LoopControl,
                 make_info: Callable[[Bundle, dict[str, Any]], dict[str, Any]],
                 config_sha256: str, recent: RecentErrors, nonces: Nonces, device: str,
                 source_kind: str = "random", engine: str = "auto") -> None:
        """`submit` hands results and model changes to the publisher; `model` is what the
        loop runs at start (`checked`: its bundle's check); `inbox` is this thread's queue;
        `control` the loop's; `engine` the model.engine setting every new version is checked
        and chosen with; `nonces` and `device` what a command's signature is checked
        against (agent/command_auth.py)."""
        super().__init__(name="commands", daemon=True)
        self.cfg = cfg
        self.loop_cfg = loop_cfg  # as the loop runs it: `set` changes it here and there
        self.source_kind = source_kind  # the inputs an updated model is warmed up and run on
        self.store = store
        self.keys = keys  # the fleet key trusted now, and rotated ones (agent/fleet_key.py)
        self.nonces = nonces
        self.device = device
        self.submit = submit
        self.bundle = bundle
        self.checked = checked  # the bundle's check: its engine, proofs and choice
        self.engine = engine
        self.model = model  # the model last handed to the loop
        self.inbox = inbox
        self.control = control
        self.make_info = make_info
        self.config_sha256 = config_sha256
        self.recent = recent
        self.trial: Trial | None = None
        self.started = time.time()
        self._closing = threading.Event()
        self.refused: deque[dict[str, Any]] = deque(maxlen=10)  # updates refused since start
        self.staging: str | None = None  # the version the current command is staging
        self.beat = time.monotonic()
        self.busy_since: float | None = None

    # --- called from other threads; none of these block -----------------------------------

    def stalled_s(self) -> float:
        """Seconds the worker has been busy with one item, or since it last looked."""
        since = self.busy_since
        return time.monotonic() - (self.beat if since is None else since)

    def close(self) -> None:
        self._closing.set()
        self.join(5.0)

    # --- the worker -----------------------------------------------------------------------

    def run(self) -> None:
        while not self._closing.is_set():
            self.beat = time.monotonic()
            item = self.inbox.get(timeout=0.5)
            if item is None:
                continue
            kind, value = item
            self.busy_since = time.monotonic()
            try:
                if kind == "window":
                    self._window(*value)
                elif kind == "fallback":
                    self._fell_back(*value)
                else:
                    self._command(*value)
            except Exception:  # a bug: say so, keep the agent and the worker running
                log.exception("commands: %s failed", kind)
            finally:
                self.busy_since = None

    def _reply(self, rid: str | None, command: str, ok: bool, result: str,
               reason: str | None = None, code: str | None = None,
               data: dict[str, Any] | None = None, publisher_state: bool = False) -> None:
        fields = {"request_id": rid, "command": command, "ok": ok, "result": result,
                  "code": code, "reason": reason, "data": data or {}}
        (log.info if ok else log.warning)("command %s %s: %s%s", command, rid, result,
                                          f" ({reason})" if reason else "")
        self.submit(CommandResult(fields, publisher_state))

    def _command(self, name: str, payload: bytes) -> None:
        self.staging = None
        try:
            rid, args, auth = parse_request(payload, int(self.cfg.max_payload_mb * 1e6))
        except Refused as exc:
            self._reply(exc.request_id, name, False, "refused", str(exc),
                        exc.code)
            return
        handlers: dict[str, Callable[[str, dict[str, Any]], None]] = {
            "update_model": self._update, "rollback": self._rollback_cmd, "set": self._set,
            "benchmark": self._benchmark, "diagnostics": self._diagnostics,
            "rotate_key": self._rotate_key}
        handler = handlers.get(name)
        if handler is None:
            self._reply(rid, name, False, "refused", f"unknown command {name!r} (known: "
                        f"{', '.join(COMMANDS)})", "unknown_command")
            return
        try:
            authorize(name, rid, args, auth, self.device, self.keys.current, self.nonces,
                      self.cfg.command_max_age_s)
            handler(rid, args)
        except Refused as exc:
            data = {"from": self.store.current()} if self.store is not None else None
            self._refused(rid, name, exc.code, str(exc), exc.vid)
            self._reply(rid, name, False, "refused", str(exc), exc.code, data)
        except (EdgeforgeError, Invalid) as exc:
            self._refused(rid, name, "error", str(exc), None)
            self._reply(rid, name, False, "failed", str(exc), "error")
        except Exception as exc:  # a bug; the sender still gets its one answer
            log.exception("commands: %s %s failed", name, rid)
            reason = f"internal error: {type(exc).__name__}: {exc}"[:500]
            self._refused(rid, name, "internal", reason, self.staging)
            self._reply(rid, name, False, "failed", reason, "internal")

    def _refused(self, rid: str, command: str, code: str, reason: str, vid: str | None) -> None:
        if command == "update_model":
            self.refused.append({"id": vid, "request_id": rid, "code": code,
                                 "reason": reason[:300],
                                 "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    # --- update and rollback --------------------------------------------------------------

    def _update(self, rid: str, args: dict[str, Any]) -> None:
        force = args.get("force", False)
        if not isinstance(force, bool):
            raise Refused("malformed", "args.force must be true or false")
        files = decode_files(args)
        store = self._need_store()
        if self.trial is not None:
            raise Refused("busy", f"version {self.trial.vid} is still on trial; retry after "
                                  f"its result")
        release = verify_release(files, self.keys.current, self.bundle.manifest,
                                 int(store.state().get("max_version", 0)), force)
        from_vid = store.current()
        if release.vid == from_vid:
            self._reply(rid, "update_model", True, "unchanged", f"{release.vid} is already "
                        f"running", data={"from": from_vid, "to": release.vid})
            return
        existed = store.path(release.vid).is_dir()
        self.staging = release.vid
        try:
            path = store.stage(release.vid, {n: release.files[n]
                                             for n in release.manifest.release_files()})
            bundle, checked, p99 = smoke_test(path, self.keys.current, self.loop_cfg,
                                              self.cfg.smoke_iters, self.cfg.smoke_max_p99_ms,
                                              self.engine)
            model = self._model(bundle, checked)
        except Refused as exc:  # the smoke test failed: nothing stays
            if not existed:
                store.discard(release.vid)
            raise Refused(exc.code, str(exc), rid, release.vid) from None
        except BaseException:  # anything nobody foresaw: nothing stays either
            if not existed:
                store.discard(release.vid)
            raise
        previous, previous_bundle, previous_checked = self.model, self.bundle, self.checked
        store.switch(release.vid, release.version, release.sha256, "update", pending=True,
                     running=True)
        self._go_live(bundle, checked, replace(model, shadow=previous.runner,
                                               fallback=previous))
        expected = float(checked["sample_accuracy_pct"]) if self.source_kind == "sample" \
            else None
        self.trial = Trial(rid, release.vid, release.sha256, from_vid, previous,
                           previous_bundle, previous_checked, expected)
        self._reply(rid, "update_model", True, "applied", f"smoke test passed (p99 "
                    f"{p99:.2f} ms); watching {self.cfg.watch_windows} window(s)",
                    data={"from": from_vid, "to": release.vid, "smoke_p99_ms": round(p99, 3),
                          "sample_max_abs_logit_diff": checked["max_abs_logit_diff"],
                          "engine": checked["engine"], "engine_reason": checked["reason"]})

    def _model(self, bundle: Bundle, checked: dict[str, Any]) -> Model:
        runner = bundle.load(checked["engine"], self.loop_cfg.threads)
        model = Model.of(bundle, runner, self.source_kind, self.loop_cfg.batch_size)
        warm_up(model, self.loop_cfg.warmup)
        return model

    def _go_live(self, bundle: Bundle, checked: dict[str, Any], model: Model) -> None:
        self.bundle, self.checked = bundle, checked
        self.submit(ModelChange(bundle.sha256, self.make_info(bundle, checked)))
        self.model = model
        self.control.swap(model)

    def _roll_back_trial(self, reason: str, verdict: Verdict | None = None) -> None:
        """Undo the trial's switch: old module back, store back, reported."""
        trial = self.trial
        assert trial is not None and self.store is not None
        self.trial = None
        left, target = self.store.rollback(reason)
        self._go_live(trial.previous_bundle, trial.previous_checked, trial.previous)
        # In the update's terms: from the version before it, to the update (now undone).
        self._reply(trial.request_id, "update_model", False, "rolled_back", reason,
                    "health", {"from": trial.from_vid, "to": left, "running": target["id"],
                               **(latency_data(verdict) if verdict else {})})

    def _rollback_cmd(self, rid: str, args: dict[str, Any]) -> None:
        self._need_store()
        reason = str(args.get("reason") or "rollback requested")
        if self.trial is not None:
            self._roll_back_trial(reason)
            self._reply(rid, "rollback", True, "rolled_back", reason)
            return
        left, to = self._roll_back_store(reason)
        self._reply(rid, "rollback", True, "rolled_back", reason, data={"from": left, "to": to})

    def _roll_back_store(self, reason: str) -> tuple[str | None, str]:
        """Switch the store to the version before, load it and hand it to the loop."""
        assert self.store is not None
        left, target = self.store.rollback(reason)
        bundle = Bundle.open(self.store.current_link.resolve(), self.keys.trusted())
        checked = bundle.check(self.engine, self.loop_cfg.batch_size, self.loop_cfg.threads)
        self._go_live(bundle, checked, self._model(bundle, checked))
        return left, str(target["id"])

    def _fell_back(self, failed_sha256: str, reason: str) -> None:
        """The loop went back to the previous model by itself: the store follows."""
        trial = self.trial
        if trial is not None and trial.sha256 == failed_sha256:
            self._roll_back_trial(reason)
        elif self.store is not None and self.bundle.sha256 == failed_sha256:
            # Confirmed in the same instant it failed: roll back as a rollback command would.
            left, to = self._roll_back_store(reason)
            log.error("update: %s after its trial ended: rolled back from %s to %s", reason,
                      left, to)

    def _need_store(self) -> Store:
        if self.store is None:
            raise Refused("no_store", "model.dir is not a versioned store's 'current' link: "
                                      "flash the board with edge-deploy flash first")
        return self.store

    # --- the trial ------------------------------------------------------------------------

    def _window(self, window: Window, fields: dict[str, Any]) -> None:
        if len(window.latencies_s) < MIN_PASSES:
            return
        trial = self.trial
        # Only the trial's own windows carry the old model's passes beside the new one's.
        if (trial is None or window.model_sha256 != trial.sha256
                or window.shadow_latencies_s is None):
            return
        trial.windows += 1
        trial.new_s.extend(window.latencies_s)
        trial.old_s.extend(window.shadow_latencies_s)
        if window.correct is not None:
            trial.correct += window.correct
            trial.labelled += window.labelled
        if trial.windows < self.cfg.watch_windows:
            return
        # The old model failing beside the new one leaves nothing to compare latency with.
        verdict = compare(trial.new_s, trial.old_s, self.cfg.max_p50_regression_pct,
                          self.cfg.max_p99_regression_pct) \
            if min(len(trial.new_s), len(trial.old_s)) >= MIN_PASSES else None
        problems = list(verdict.problems) if verdict else []
        if trial.expected_accuracy_pct is not None and trial.labelled:
            acc = 100.0 * trial.correct / trial.labelled
            if acc < trial.expected_accuracy_pct - self.cfg.max_accuracy_drop_pct:
                problems.append(f"sample accuracy {acc:.1f}% is below the manifest's "
                                f"{trial.expected_accuracy_pct:.1f}% by more than "
                                f"{self.cfg.max_accuracy_drop_pct:g} points")
        summary = verdict.summary() if verdict else "latency not compared (the old model " \
            "failed beside the new one)"
        if problems:
            self._roll_back_trial("; ".join(problems) + f" [{summary}]", verdict)
            return
        assert self.store is not None
        self.trial = None
        # Stop timing the old model beside the new one; the trial's fallback ends with it.
        self.model = replace(self.model, shadow=None, fallback=None)
        self.control.swap(self.model)
        removed = self.store.confirm(trial.vid, self.cfg.keep)
        self._reply(trial.request_id, "update_model", True, "confirmed",
                    f"healthy for {trial.windows} window(s): {summary}",
                    data={"from": trial.from_vid, "to": trial.vid, "pruned": removed,
                          **(latency_data(verdict) if verdict else {})})

    # --- the other commands ---------------------------------------------------------------

    def _set(self, rid: str, args: dict[str, Any]) -> None:
        try:
            changes = loop_changes(args)
        except ValueError as exc:
            raise Refused("malformed", str(exc)) from None
        try:
            # LoopConfig's __post_init__ checks the ranges, as for the config file.
            cfg = replace(self.loop_cfg,
                          rate_hz=changes.get("rate_hz", self.loop_cfg.rate_hz),
                          window_s=changes.get("window_s", self.loop_cfg.window_s))
        except Invalid as exc:
            raise Refused("invalid", f"loop.{exc}") from None
        self.loop_cfg = cfg
        self.control.configure(cfg)
        self._reply(rid, "set", True, "done", "applies until the agent restarts (edit "
                    "/etc/edgeforge/config.yaml to keep it)",
                    data={"rate_hz": cfg.rate_hz, "window_s": cfg.window_s})

    def _benchmark(self, rid: str, args: dict[str, Any]) -> None:
        sizes = args.get("batch_sizes", [self.loop_cfg.batch_size])
        iters = args.get("iters", 200)
        if (not isinstance(sizes, list) or not sizes or not all(
                isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 256 for b in sizes)
                or isinstance(iters, bool) or not isinstance(iters, int)
                or not 1 <= iters <= 100_000):
            raise Refused("malformed", "benchmark takes batch_sizes (a list of 1-256) and iters "
                                       "(1-100000)")
        if iters * sum(sizes) > MAX_BENCH_IMAGES:
            raise Refused("malformed", f"benchmark of iters x sum(batch_sizes) = "
                                       f"{iters * sum(sizes):,} images is over "
                                       f"{MAX_BENCH_IMAGES:,}: ask for fewer iters")
        result = bench(self.bundle, sizes, iters, self.loop_cfg.warmup, self.loop_cfg.threads,
                       self.engine)
        result["note"] = "measured while the inference loop kept running"
        self._reply(rid, "benchmark", True, "done", data={**result, "table": table(result)})

    def _rotate_key(self, rid: str, args: dict[str, Any]) -> None:
        """Trust a new fleet key from now on (agent/fleet_key.py): this command is signed by
        the current key (authorize), and `proof` shows the sender holds the new one."""
        pem, proof = args.get("public_key"), args.get("proof")
        if not isinstance(pem, str) or not isinstance(proof, str):
            raise Refused("malformed", "rotate_key takes public_key (PEM text) and proof (the "
                                       "new key's base64 signature): use edge-deploy rotate-key")
        try:
            new = parse_public_key(pem)
        except ValueError as exc:
            raise Refused("malformed", f"public_key is not a PEM Ed25519 public key "
                                       f"({exc})") from None
        try:
            new.verify(base64.b64decode(proof, validate=True),
                       rotation_statement(self.device, rid, key_id(new)))
        except (InvalidSignature, binascii.Error, ValueError):
            raise Refused("bad_proof", f"proof is not key {key_id(new)}'s signature of this "
                                       f"rotation: the sender does not hold the new key") from None
        assert self.keys.current is not None  # authorize() refused the command otherwise
        old = key_id(self.keys.current)
        if key_id(new) == old:
            self._reply(rid, "rotate_key", True, "unchanged", f"key {old} is already trusted")
            return
        try:
            self.keys.rotate(new)
        except OSError as exc:
            raise Refused("internal", f"cannot record the rotation in {self.keys.path} "
                                      f"({exc.strerror}): the board still trusts key {old}"
                          ) from None
        self._reply(rid, "rotate_key", True, "done", f"this board now trusts key {key_id(new)} "
                    f"for commands and updates (key {old} only for versions already stored)",
                    data={"from_key": old, "to_key": key_id(new)})

    def _diagnostics(self, rid: str, args: dict[str, Any]) -> None:
        versions = self.store.summary() if self.store is not None else None
        trial, sha = self.trial, self.bundle.sha256
        # spool_depth, dropped_total and mqtt_connected are added by the publisher thread,
        # which owns the spool and the connection (publisher_state).
        self._reply(rid, "diagnostics", True, "done", publisher_state=True, data={
            "agent_version": agent.__version__, "engine": self.checked["engine"],
            "engine_version": self.checked["engine_version"],
            "runtimes": {name: installed(name) for name in ENGINES},
            "uptime_s": round(time.time() - self.started, 1), "model_sha256": sha,
            "versions": versions, "config_sha256": self.config_sha256,
            "loop": asdict(self.loop_cfg),
            "trial": None if trial is None else {"version": trial.vid,
                                                 "windows_seen": trial.windows},
            "rejected": [*({"how": "rolled_back", **r} for r in (versions or {}).get(
                "rejected", [])), *({"how": "refused", **r} for r in self.refused)],
            "windows_unobserved": self.inbox.unobserved,
            "recent_errors": list(self.recent.lines)})


def latency_data(verdict: Verdict) -> dict[str, Any]:
    """A trial verdict's figures for cmd_result's data (ms)."""
    return {"new_p50_ms": round(verdict.new_p50_ms, 4), "old_p50_ms": round(verdict.old_p50_ms, 4),
            "new_p99_ms": round(verdict.new_p99_ms, 4), "old_p99_ms": round(verdict.old_p99_ms, 4),
            "mann_whitney_p": verdict.p_value, "paired_passes": verdict.passes}


def config_sha256(cfg: AgentConfig) -> str:
    """A fingerprint of the resolved config (file plus overrides), for diagnostics."""
    plain = asdict(cfg)
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()

