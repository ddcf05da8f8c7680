"""Benchmark: edge-monitor against a simulated fleet (benchmarks/fleet_sim.py), one run.

    .venv/bin/python benchmarks/monitor_targets.py [--boards 5000] [--window-s 10]
                                                   [--duration 60] [--slow 50] [--recorders 1]

Starts a real mosquitto with its default limits on a free loopback port, then
`edge-monitor record` and `edge-monitor serve --prometheus` as subprocesses, announces the
fleet (retained status, info and a summary per board) and runs it for --duration seconds
(one telemetry message and one retained summary per board per window). With --recorders N
above 1, N `record --share bench` split the telemetry into one history file. Then measures:
  1. lost: telemetry windows published minus windows stored (0 is the target), and
     duplicated: what the recorders say they stored minus the distinct windows (0);
     the lag: from the fleet's last window to the history holding every window (the
     recorders commit once a second; target under 2 s for the shared run);
  2. each `record`'s CPU over the run, in % of one core (psutil; target under 15 %);
  3. `edge-monitor --once --json --listen 2`: wall time from start to exit, and how many
     boards it lists with their info and a window (target: all, within 5 s);
  4. `edge-monitor check`: the share of the --slow boards it names (target 100 %);
  5. a scrape of /metrics: the median of 5 (target under 150 ms).
Prints a table and writes build/bench-monitor/results.json; exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.fleet_sim import FleetSim  # noqa: E402
from benchmarks.targets import Check, as_json, report  # noqa: E402
from deploy.monitor.history import History  # noqa: E402
from tests.support.broker import Broker, free_port  # noqa: E402


def monitor_cmd(port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "deploy.monitor.cli", "--set", f"mqtt.port={port}",
            "--set", "mqtt.host=127.0.0.1", *args]


def drained(history: Path, sent: int, limit_s: float = 60.0) -> float:
    """Seconds until the history holds `sent` windows (checked every 0.1 s), or `limit_s`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        h = History(history, 7 * 86400)
        try:
            if h.total() >= sent:
                return time.monotonic() - t0
        finally:
            h.close()
        time.sleep(0.1)
    return limit_s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--boards", type=int, default=5000)
    p.add_argument("--window-s", type=float, default=10.0)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--slow", type=int, default=50)
    p.add_argument("--recorders", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("build/bench-monitor"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-monitor-"))
    broker = Broker(work / "broker")
    broker.start()
    history = work / "history.sqlite3"
    metrics_port = free_port()
    names = [f"record{n}" for n in range(args.recorders)]
    logs = {name: (work / f"{name}.log").open("w") for name in (*names, "serve")}
    share = ["--share", "bench"] if args.recorders > 1 else []
    recorders = [subprocess.Popen(monitor_cmd(broker.port, "--set", f"monitor.history={history}",
                                              "record", *share), cwd=ROOT, stdout=logs[name],
                                  stderr=subprocess.STDOUT) for name in names]
    serve = subprocess.Popen(monitor_cmd(broker.port, "serve", "--prometheus",
                                         f"127.0.0.1:{metrics_port}"), cwd=ROOT,
                             stdout=logs["serve"], stderr=subprocess.STDOUT)
    results: dict[str, Any] = {"boards": args.boards, "window_s": args.window_s,
                               "duration_s": args.duration}
    sim = None
    try:
        time.sleep(3)  # both connected and subscribed
        sim = FleetSim("127.0.0.1", broker.port, args.boards, args.window_s, slow=args.slow)
        t0 = time.monotonic()
        sim.announce()
        print(f"announced {args.boards} boards in {time.monotonic() - t0:.1f} s; running "
              f"{args.duration:g} s at {args.boards / args.window_s:,.0f} windows/s ...",
              file=sys.stderr, flush=True)
        procs = [psutil.Process(r.pid) for r in recorders]
        cpu0, wall0 = [p_.cpu_times() for p_ in procs], time.monotonic()
        sent_before = sum(sim.seq.values())
        sim.run(args.duration)
        results["telemetry_sent"] = sum(sim.seq.values()) - sent_before
        # Announced summaries are not telemetry: the history holds only what run() sent.
        results["lag_s"] = drained(history, results["telemetry_sent"])
        cpu1, wall1 = [p_.cpu_times() for p_ in procs], time.monotonic()
        results["record_cpu_pct"] = [
            100 * ((b.user + b.system) - (a.user + a.system)) / (wall1 - wall0)
            for a, b in zip(cpu0, cpu1, strict=True)]

        scrapes = []
        for _ in range(5):
            s0 = time.perf_counter()
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                        timeout=30) as r:
                body = r.read()
            scrapes.append(time.perf_counter() - s0)
        results["scrape_ms"] = [round(s * 1000, 1) for s in scrapes]
        results["scrape_bytes"] = len(body)

        o0 = time.monotonic()
        once = subprocess.run(monitor_cmd(broker.port, "--once", "--json", "--listen", "2"),
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        results["once_s"] = round(time.monotonic() - o0, 2)
        rows = json.loads(once.stdout)["devices"] if once.returncode == 0 else []
        results["once_listed"] = len(rows)
        results["once_with_info_and_window"] = sum(
            1 for r in rows if r["model_version"] is not None
            and r["seconds_since_telemetry"] is not None)
        check = subprocess.run(monitor_cmd(broker.port, "check", "--listen", "2"), cwd=ROOT,
                               capture_output=True, text=True, timeout=300)
        named = {line.split()[1] for line in check.stdout.splitlines()
                 if line.startswith("ALERT ") and " p99_high: " in line}
        results["check_slow_named"] = len(named & sim.slow)
        results["check_exit"] = check.returncode
    finally:
        for proc_ in (*recorders, serve):
            proc_.send_signal(signal.SIGINT)
            proc_.wait(30)
        for f in logs.values():
            f.close()
        if sim is not None:
            sim.close()
        broker.stop()
    h = History(history, 7 * 86400)
    stored = h.total()
    h.close()
    results["telemetry_stored"] = stored
    said = [int(m.group(1)) for name in names if (m := re.search(
        r"record: (\d+) window\(s\) stored", (work / f"{name}.log").read_text()))]
    results["stored_by_recorder"] = said
    lost = results["telemetry_sent"] - stored
    checks: list[Check] = [
        ("telemetry windows lost (sent - recorded)", lost, 0, "<="),
        ("windows stored twice (recorders' sum - distinct)", sum(said) - stored, 0, "<="),
        ("lag: last window sent to all recorded, s", results["lag_s"], 2.0, "<="),
        ("record CPU, % of one core (the busiest recorder)", max(results["record_cpu_pct"]),
         15.0, "<="),
        ("--once --listen 2: boards with info and a window, %",
         100 * results["once_with_info_and_window"] / args.boards, 100.0, ">="),
        ("--once --listen 2: start to exit, s", results["once_s"], 5.0, "<="),
        ("check: slow boards named, %", 100 * results["check_slow_named"] / max(1, args.slow),
         100.0, ">="),
        ("/metrics scrape, median of 5, ms", statistics.median(results["scrape_ms"]), 150.0,
         "<="),
    ]
    results["checks"] = as_json(checks)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"{args.boards} boards, {args.window_s:g} s windows, {args.duration:g} s: "
          f"{results['telemetry_sent']:,} windows sent, {stored:,} recorded; scrape "
          f"{results['scrape_bytes']:,} bytes")
    return 0 if report(checks, 56) else 1


if __name__ == "__main__":
    raise SystemExit(main())
