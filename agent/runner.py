"""`edge-agent run`: verify and load the bundle, start the publisher, run the loop, stop cleanly.

Start-up order: config -> bundle verified and checked on this board, its engine chosen ->
the first inference (the cold start, `cold_start_ms` in `info`) and the warm-up -> only then
the modules that serve it imported (paho, ssl, psutil) and the spool opened (restart count
and last exit reason read) -> the publisher built (TLS files checked) -> the commands thread
and the loop built, each object once, with what it talks to passed in (the commands inbox,
the loop's LoopControl, for a real source its frame queue and source thread:
agent/sources.py) -> threads started (the publisher connects in the background) -> READY=1
-> the loop. SIGTERM or SIGINT
close the current window, flush what the broker will take within a few seconds, publish
`offline` and exit 0; whatever was not acknowledged stays spooled for the next start.

Supervision: the loop asks `supervise()` about once a second whether the publisher and the
commands worker are alive and going round their loops. If one died or is stuck, the watchdog
is no longer fed, the agent exits 1 within seconds and systemd restarts it; the next start
publishes the reason as an `event` (and `last_exit` in `info`). No thread dies while the
process lives on.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import signal
import socket
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import agent
from agent import engines
from agent.bundle import Bundle, describe
from agent.command_auth import Nonces
from agent.command_inbox import CommandInbox
from agent.config import AgentConfig, SourceConfig
from agent.errors import ImageError
from agent.fleet_key import FleetKey, keys_path
from agent.homeassistant import discovery_messages
from agent.loop import Feed, InferenceLoop, LoopControl, Model, warm_up
from agent.predictions import Predictor
from agent.sdnotify import Notifier
from agent.sources import SourceThread, queue_for, start_source
from agent.spool import Spool, spool_path
from agent.store import Store, recover_trial
from agent.telemetry import INFO_SCHEMA, Topics
from agent.timing import process_age_s

if TYPE_CHECKING:  # imported by run_agent after the first inference
    from agent.publisher import Publisher
    from agent.remote_commands import Commands

log = logging.getLogger(__name__)

STOP_BUDGET_S = 4.0  # SIGTERM to exit; systemd's TimeoutStopSec in the unit is longer


def supervise(publisher: Publisher, commands: Commands,
              source: SourceThread | None = None) -> str | None:
    """None while every worker thread is alive and making progress, else what is wrong."""
    from agent.publisher import STALL_S as PUBLISHER_STALL_S  # loaded by then (run_agent)
    from agent.remote_commands import STALL_S as COMMANDS_STALL_S

    threads: list[tuple[str, Any, float]] = [("publisher", publisher, PUBLISHER_STALL_S),
                                             ("commands", commands, COMMANDS_STALL_S)]
    if source is not None:
        threads.append((f"{source.cfg.kind} source", source, float("inf")))
    for name, thread, limit in threads:
        error = getattr(thread, "error", None)
        if error is not None:
            return f"the {name} thread failed ({type(error).__name__}: {error})"
        if not thread.is_alive():
            return f"the {name} thread ended"
        stalled = thread.stalled_s()
        if stalled > limit:
            return f"the {name} thread has made no progress for {stalled:.0f} s"
    return None


def run_agent(cfg: AgentConfig, duration_s: float | None = None) -> int:
    """Run the agent until a signal or `duration_s`; return the exit code."""
    notifier = Notifier()
    device = cfg.device.resolved_id
    loop_cfg = cfg.loop

    state = spool_path(cfg.spool.path, os.environ, os.geteuid() == 0)
    keys = FleetKey.load(cfg.update.public_key, keys_path(state))
    model_dir = Path(cfg.model.dir)
    store = Store.behind(model_dir)
    rolled_back = recover_trial(store) if store is not None else None
    # A store's bundle is opened at its real path: `current` may point elsewhere later.
    bundle = Bundle.open(model_dir.resolve() if store else model_dir, keys.trusted())
    # The model first, then the spool and the network: the first inference ends as early as
    # the process can manage (cold_start_ms), and a model that cannot run never counts as a
    # start in the spool. The loop runs the runner the check proved (and timed, for auto).
    checked, runner = bundle.choose(cfg.model.engine, loop_cfg.batch_size, loop_cfg.threads)
    for row in checked["engines"]:
        log.info("engine %s %s: %s%s", row["engine"], row["version"] or "-", row["status"],
                 f" ({row['detail']})" if "detail" in row else
                 f", sample of {checked['sample_images']} reproduced (max |logit diff| "
                 f"{row['max_abs_logit_diff']:.3g})")
    log.info("bundle %s verified: sha256 %s...; running %s", bundle.dir, bundle.sha256[:12],
             describe(checked))
    load_ms = next(r["load_ms"] for r in checked["engines"] if r["engine"] == runner.engine)
    model = Model.of(bundle, runner, cfg.source.kind, loop_cfg.batch_size)
    first_ms = warm_up(model, 1) * 1000
    age = process_age_s()  # the first inference is done: the cold start, from exec
    cold_ms = age * 1000 if age is not None else None
    if loop_cfg.warmup > 1:
        warm_up(model, loop_cfg.warmup - 1)
    # What serves the model is imported only now, after the first inference: the publisher
    # and the commands (paho, ssl, psutil, sqlite3) took 60 ms of a 0.5 s torch-free cold
    # start here (README: the engine targets).
    from agent.publisher import Publisher
    from agent.remote_commands import Commands, RecentErrors, config_sha256
    from agent.stats import ResourceStats

    spool_cfg = cfg.spool
    spool = Spool(state, int(spool_cfg.max_mb * 1e6), spool_cfg.max_age_s)
    log.info("spool %s: %d message(s) waiting, next telemetry seq %s", spool.path, spool.depth,
             spool.get("seq.telemetry", 1))
    starts = int(spool.get("starts", 0) or 0) + 1
    last_exit = str(spool.get("last_exit") or "first start")
    events = [("rollback", rolled_back)] if rolled_back else []
    if last_exit.startswith("error"):
        events.append(("restarted", f"the last run ended with {last_exit}"))
    if spool.get("running"):
        last_exit = "killed (no clean shutdown: SIGKILL, watchdog, crash or power loss)"
    ha = cfg.homeassistant
    discovery = (f"{ha.discovery_prefix.rstrip('/')}/status",
                 discovery_messages(ha.discovery_prefix, device,
                                    Topics.for_device(cfg.mqtt.topic_prefix, device))) \
        if ha.enabled else None
    def make_info(b: Bundle, c: dict[str, Any]) -> dict[str, Any]:
        return {**birth_info(cfg, device, b, c, starts, last_exit, load_ms, first_ms),
                "cold_start_ms": None if cold_ms is None else round(cold_ms, 1)}

    inbox = CommandInbox()
    src = cfg.source
    frames = queue_for(src) if src.serving else None
    source = start_source(src, frames, spool.markers("file:")) if frames is not None else None
    feed = Feed(frames, Predictor(src), src.max_image_pixels) if frames is not None else None
    try:
        # Built before anything is recorded: it checks the TLS files (ConfigError).
        publisher = Publisher(cfg.mqtt, device, spool, ResourceStats(), make_info(bundle, checked),
                              bundle.sha256, commands=inbox, startup_events=events,
                              discovery=discovery,
                              requests=frames if src.kind == "mqtt" else None,
                              max_request_bytes=int(src.max_image_mb * 1e6),
                              prompt=src.serving, response_prefix=src.response_prefix)
    except BaseException:
        spool.close()
        raise
    spool.set("starts", starts)
    spool.set("running", 1)

    reason = ["duration" if duration_s is not None else "stopped"]
    code = 0
    control = LoopControl()
    loop: InferenceLoop | None = None
    previous: dict[int, Any] = {}
    recent = RecentErrors()
    logging.getLogger("agent").addHandler(recent)
    commands: Commands | None = None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        reason[0] = signal.Signals(signum).name
        control.stop()

    try:
        if src.serving:
            warm_images(model)
        commands = Commands(cfg.update, loop_cfg, store, keys, publisher.submit, bundle,
                            checked, model, inbox, control, make_info, config_sha256(cfg),
                            recent, Nonces(spool.path.with_name(spool.path.name + ".nonces.json"),
                                           cfg.update.command_max_age_s),
                            device, source_kind=src.kind, engine=cfg.model.engine)
        loop = InferenceLoop(model, loop_cfg, control, publisher.submit, notifier,
                             healthy=functools.partial(supervise, publisher, commands, source),
                             fell_back=inbox.fell_back, feed=feed)
        commands.start()
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        publisher.start()
        if source is not None:
            # A live source's results go out only while connected: let the first attempt
            # settle, so a video's first frames do not meet a broker not yet connected.
            if not publisher.first_attempt():
                log.warning("mqtt: no answer from %s:%d yet; the source starts anyway and its "
                            "live results count as dropped until connected", cfg.mqtt.host,
                            cfg.mqtt.port)
            source.start()
        log.info("running %s on %s %s: model loaded in %.0f ms, first inference %.1f ms "
                 "(%s ms after the process started), %d warm-up runs; source %s, batch %d, %s, "
                 "%d thread(s), windows of %g s; telemetry to %s:%d %s", device,
                 checked["engine"], checked["engine_version"], load_ms, first_ms,
                 "?" if cold_ms is None else f"{cold_ms:.0f}", loop_cfg.warmup,
                 describe_source(src),
                 loop_cfg.batch_size, "the source's pace" if src.serving else
                 f"{loop_cfg.rate_hz:g} Hz" if loop_cfg.rate_hz else "full rate",
                 loop_cfg.threads, loop_cfg.window_s, cfg.mqtt.host, cfg.mqtt.port,
                 publisher.topics.telemetry)
        notifier.ready(f"running {device}: {bundle.sha256[:12]} on {checked['engine']}")
        loop.run(duration_s)
        if loop.failure is not None:
            log.error("stopping: %s (exit 1, so systemd restarts the agent)", loop.failure)
            reason[0], code = f"error: {loop.failure}", 1
    except RuntimeError as exc:
        # A forward pass that fails mid-run: exit 1 so systemd restarts the service.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.error("inference failed: %s", first)
        reason[0], code = f"error: {first}", 1
    except BaseException as exc:
        reason[0] = f"error: {type(exc).__name__}: {exc}"
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        notifier.stopping()
        if source is not None:
            source.stop()
            if source.is_alive():
                source.join(2.0)
        if commands is not None and commands.is_alive():
            commands.close()
        logging.getLogger("agent").removeHandler(recent)
        if publisher.error is not None and code == 0:
            reason[0], code = f"error: publisher failed ({publisher.error})", 1
        if publisher.is_alive():
            publisher.close(STOP_BUDGET_S)
        spool.set("last_exit", reason[0])
        spool.set("running", 0)
        spool.close()
        notifier.close()
    log.info("stopped (%s) after %d window(s)", reason[0], loop.windows if loop else 0)
    return code


def birth_info(cfg: AgentConfig, device: str, bundle: Bundle, checked: dict[str, Any],
               starts: int, last_exit: str, load_ms: float, first_ms: float) -> dict[str, Any]:
    """The retained `info` message: who this agent is and what it runs."""
    m = bundle.manifest
    loop_cfg = cfg.loop
    return {
        "schema": INFO_SCHEMA, "device": device, "agent_version": agent.__version__,
        "python_version": platform.python_version(),
        "machine": platform.machine(), "hostname": socket.gethostname(), "pid": os.getpid(),
        "engine": checked["engine"], "engine_version": checked["engine_version"],
        "engine_choice": {"setting": checked["choice"], "reason": checked["reason"],
                          "engines": checked["engines"]},
        "runtimes": {name: engines.installed(name) for name in engines.ENGINES},
        "quantized_engine": m.engine,
        "threads": loop_cfg.threads, "batch_size": loop_cfg.batch_size,
        "source": cfg.source.kind, "source_path": cfg.source.path,
        "rate_hz": loop_cfg.rate_hz, "window_s": loop_cfg.window_s,
        "model_file": m.board_model, "model_sha256": bundle.sha256,
        "model_version": bundle.signature.version if bundle.signature else None,
        "model_dir": str(bundle.dir.resolve()),
        "quantization_mode": m.quantization.get("mode"), "data_source": m.data.get("source"),
        "bundle_created_utc": m.created_utc, "manifest_metrics": m.metrics,
        "sample_accuracy_pct": checked["sample_accuracy_pct"],
        "sample_max_abs_logit_diff": checked["max_abs_logit_diff"],
        "load_ms": round(load_ms, 2), "first_inference_ms": round(first_ms, 3),
        "restart_count": starts - 1, "last_exit": last_exit,
    }


def describe_source(src: SourceConfig) -> str:
    """The source in a few words, for the start-up line."""
    if src.kind == "mqtt":
        return "mqtt (requests on <prefix>/<id>/infer)"
    if src.kind == "folder":
        return f"folder {src.path} (then {src.after})"
    if src.kind in ("video", "camera"):
        policy = f"{src.publish}" + (f" {src.max_per_s:g}/s" if src.publish == "rate" else "")
        return f"{src.kind} {src.path}, publishing {policy}"
    return src.kind


def warm_images(model: Model) -> None:
    """Load the image decoder before the first input arrives; without it, say once what to
    install (each input then gets the same message as its error)."""
    if model.preprocess is None:
        return
    try:
        model.preprocess.warm_up()
    except ImageError as exc:
        log.error("%s", exc)
