"""Inputs from the network, the disk and the filesystem treated as hostile: each case here once
crashed a process, hung it, lost data or gave a confident wrong answer. Real agents and
monitors as subprocesses, a real mosquitto, real files, FIFOs and a real full filesystem."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from PIL import Image

from agent.preprocess import Preprocess
from tests.deploy.test_monitor import background, metric, metrics, monitor, wait
from tests.support import Agent, copy_bundle, run_cli
from tests.support.broker import Broker, Subscriber, free_port
from tests.support.hostile import (
    bomb_png,
    can_mount,
    encode,
    grey16_png,
    nested_json,
    small_filesystem,
    until_answered,
)
from tests.support.media import host_top, png_bytes, results, sample_images, write_pngs

INFER = "edgeforge/testboard/infer"


def stop(agent: Agent) -> str:
    """SIGTERM, a clean exit with no traceback; the agent's output."""
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.wait(20) == 0, agent.output()
    out = agent.output()
    assert "Traceback" not in out, out
    return out


def publisher(port: int, name: str) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def aged(path: Path) -> None:
    """Give a file an mtime a minute ago: written long before, so complete."""
    old = time.time() - 60
    os.utime(path, (old, old))


def serving(pub: mqtt.Client, sub: Subscriber, image: bytes) -> None:
    """Wait until the agent answers requests (probes: request ids probe-1, probe-2, ...)."""
    until_answered(lambda n: pub.publish(f"{INFER}/probe-{n}", image, qos=1)
                   .wait_for_publish(5),
                   lambda: any(str(r.get("request_id")).startswith("probe-")
                               for r in results(sub.on("/result"))))


def answers(sub: Subscriber) -> list[dict[str, Any]]:
    """The results of the requests a test sent, without the probes."""
    return [r for r in results(sub.on("/result"))
            if not str(r.get("request_id")).startswith("probe-")]


def grey_sample(bundle: Path, count: int) -> list[np.ndarray]:
    """`count` of the bundle's sample images in 8-bit grey (HxW uint8)."""
    images, _ = sample_images(bundle)
    return [np.asarray(Image.fromarray(images[i].permute(1, 2, 0).numpy(), "RGB").convert("L"))
            for i in range(count)]


# --- images ------------------------------------------------------------------------------

@pytest.mark.e2e
def test_a_png_whose_header_claims_ten_billion_pixels_is_refused_over_mqtt_and_in_a_folder(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    """Before: Pillow's DecompressionBombError escaped the preprocess and killed the agent,
    and in a folder again at every restart."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "bomb.png").write_bytes(bomb_png())
    aged(inbox / "bomb.png")
    sub = Subscriber(broker.port)
    agent = Agent(bundle, broker.port, tmp_path, "source.kind=folder", f"source.path={inbox}",
                  "source.poll_s=0.2")
    wait(lambda: (inbox / "failed" / "bomb.png").exists(), 60, "the bomb moved aside")
    names = write_pngs(bundle, inbox, 2)
    sub.wait_for(lambda: len(sub.on("/result")) >= 2, 60, "the next files' results")
    stop(agent)
    reason = (inbox / "failed" / "bomb.png.reason.txt").read_text()
    assert "100000x100000" in reason or "10000000000 pixels" in reason, reason
    assert sorted(r["source_id"] for r in results(sub.on("/result"))) == names
    # And over MQTT, on a fresh agent: an error result, then the next request is served.
    (tmp_path / "mqtt").mkdir()
    agent = Agent(bundle, broker.port, tmp_path / "mqtt", "source.kind=mqtt")
    images, _ = sample_images(bundle)
    pub = publisher(broker.port, "bomber")
    serving(pub, sub, png_bytes(images[0]))
    pub.publish(f"{INFER}/bomb", bomb_png(), qos=1).wait_for_publish(5)
    pub.publish(f"{INFER}/after", png_bytes(images[0]), qos=1).wait_for_publish(5)
    sub.wait_for(lambda: {"bomb", "after"} <= {r.get("request_id") for r in
                                                results(sub.on("/result"))}, 60, "both answers")
    pub.disconnect()
    stop(agent)
    sub.close()
    got = {r.get("request_id"): r for r in results(sub.on("/result"))}
    assert got["bomb"]["top"] == [] and "pixels" in got["bomb"]["error"], got["bomb"]
    assert got["after"]["top"] and "error" not in got["after"]


@pytest.mark.e2e
def test_16_bit_greyscale_pngs_are_classified_as_their_8_bit_selves(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    """Before: 16-bit samples were clipped to 255 (near white) and classified with
    confidence, in a folder and over MQTT."""
    greys = grey_sample(bundle, 3)
    eight = [encode(Image.fromarray(g, "L")) for g in greys]
    sixteen = [grey16_png(g) for g in greys]
    prep = Preprocess((32, 32), (0.0,) * 3, (1.0,) * 3)
    for e, s in zip(eight, sixteen, strict=True):
        assert Image.open(io.BytesIO(s)).mode.startswith("I")
        np.testing.assert_array_equal(prep.encoded(e), prep.encoded(s))
    expected = host_top(bundle, eight)
    sub = Subscriber(broker.port)
    agent = Agent(bundle, broker.port, tmp_path, "source.kind=mqtt")
    pub = publisher(broker.port, "sixteen")
    serving(pub, sub, eight[0])
    for i, data in enumerate(sixteen):
        pub.publish(f"{INFER}/g{i}", data, qos=1).wait_for_publish(5)
    sub.wait_for(lambda: len(answers(sub)) >= 3, 60, "three answers")
    pub.disconnect()
    stop(agent)
    sub.close()
    for r in answers(sub):
        i = int(r["request_id"][1:])
        assert r["top"] == expected[r["engine"]][i], (r, expected[r["engine"]][i])


@pytest.mark.unit
@pytest.mark.parametrize("mode, make, expect", [
    ("palette with transparency", lambda: Image.new("P", (40, 40)), "ok"),
    ("LA", lambda: Image.new("LA", (40, 40), (120, 30)), "ok"),
    ("CMYK JPEG", lambda: Image.new("CMYK", (40, 40), (0, 200, 30, 10)), "ok"),
    ("32-bit float TIFF", lambda: Image.new("F", (40, 40), 0.5), "floating-point"),
    ("32-bit integer beyond 16 bits", lambda: Image.new("I", (40, 40), 1_000_000), "32-bit"),
    ("animated GIF", None, "ok"),
])
def test_every_pixel_format_becomes_rgb_or_is_refused_with_its_reason(
        mode: str, make: Any, expect: str) -> None:
    prep = Preprocess((32, 32), (0.0,) * 3, (1.0,) * 3)
    if make is None:
        frames = [Image.new("RGB", (40, 40), c) for c in ("red", "blue")]
        data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    else:
        img = make()
        if img.mode == "P":
            img.info["transparency"] = 0
        fmt = "JPEG" if img.mode == "CMYK" else "TIFF" if img.mode in ("F", "I") else "PNG"
        data = encode(img, fmt)
    if expect == "ok":
        out = prep.encoded(data)
        assert out.shape == (3, 32, 32) and np.isfinite(out).all()
        if make is None:  # the first frame of an animation
            assert out[0].min() > 0.9 and out[2].max() < 0.1
    else:
        from agent.errors import ImageError
        with pytest.raises(ImageError, match=expect):
            prep.encoded(data)


# --- files and the folder ------------------------------------------------------------------

@pytest.mark.e2e
def test_a_file_written_with_a_pause_is_classified_once_complete_not_failed(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    """Before: a writer pausing 2 s mid-file had its file moved to failed/ as truncated,
    even with inotify; now it is taken when closed, or unchanged for settle_s."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    images, _ = sample_images(bundle)
    data = png_bytes(images[1])
    sub = Subscriber(broker.port)
    agent = Agent(bundle, broker.port, tmp_path, "source.kind=folder", f"source.path={inbox}",
                  "source.poll_s=0.2")  # the default settle_s: 5 s
    wait(lambda: "watching" in agent.output(), 60, "the folder watched")

    def slow_writer() -> None:
        with (inbox / "slow.png").open("wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            time.sleep(2.5)
            f.write(data[len(data) // 2:])

    writer = threading.Thread(target=slow_writer)
    writer.start()
    writer.join()
    sub.wait_for(lambda: bool(sub.on("/result")), 30, "the slow file's result")
    time.sleep(0.5)
    stop(agent)
    sub.close()
    got = results(sub.on("/result"))
    assert [r["source_id"] for r in got] == ["slow.png"]
    assert got[0]["top"] == host_top(bundle, [data])[got[0]["engine"]][0]
    assert not (inbox / "failed" / "slow.png").exists()


@pytest.mark.e2e
def test_a_file_answered_before_a_crash_is_not_answered_again(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    """The state a kill -9 leaves between a result's commit and the file's move: the result
    is in the spool, the file still in the folder. Before: classified again at the start."""
    inbox = tmp_path / "inbox"
    names = write_pngs(bundle, inbox, 3)
    for name in names:
        aged(inbox / name)
    spool = tmp_path / "spool.db"
    sub = Subscriber(broker.port)
    agent = Agent(bundle, broker.port, tmp_path, "source.kind=folder", f"source.path={inbox}",
                  "source.poll_s=0.2", "source.after=keep")
    sub.wait_for(lambda: len(sub.on("/result")) >= 3, 60, "three results")
    stop(agent)
    first = results(sub.on("/result"))
    # after=keep leaves the files where a crash before the move would have left them
    agent = Agent(bundle, broker.port, tmp_path, "source.kind=folder", f"source.path={inbox}",
                  "source.poll_s=0.2", "source.after=move")
    wait(lambda: sorted(p.name for p in (inbox / "done").glob("*.png")) == names, 60,
         "the files handled")
    time.sleep(1.0)
    out = stop(agent)
    sub.close()
    assert len(results(sub.on("/result"))) == len(first) == 3, out
    assert out.count("already has its result") == 3, out
    with sqlite3.connect(spool) as db:
        assert db.execute("SELECT COUNT(*) FROM answered").fetchone()[0] == 3


@pytest.mark.e2e
def test_kill_9_at_random_moments_gives_every_file_exactly_one_result(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    """Before: after kill -9 and a restart, one image of 2,000 got two results."""
    inbox = tmp_path / "inbox"
    names = write_pngs(bundle, inbox, 400)
    for name in names:
        aged(inbox / name)
    sub = Subscriber(broker.port)
    rng = np.random.default_rng(7)
    for _ in range(6):
        agent = Agent(bundle, broker.port, tmp_path, "source.kind=folder",
                      f"source.path={inbox}", "source.poll_s=0.1", "loop.rate_hz=100")
        wait(lambda a=agent: "watching" in a.output(), 60, "the folder watched")
        time.sleep(float(rng.uniform(0.2, 1.5)))
        agent.proc.kill()
        agent.proc.wait(10)
    agent = Agent(bundle, broker.port, tmp_path, "source.kind=folder", f"source.path={inbox}",
                  "source.poll_s=0.1")
    wait(lambda: "watching" in agent.output(), 60, "the folder watched")
    wait(lambda: len(list((inbox / "done").glob("*.png"))) == len(names), 120, "every file done")
    sub.wait_for(lambda: len({r["source_id"] for r in results(sub.on("/result"))})
                 == len(names), 60, "every result")
    time.sleep(1.0)
    stop(agent)
    sub.close()
    # A result the broker delivered before the kill, whose acknowledgement the agent never
    # saw, is sent again from the spool byte for byte, seq included (MQTT's at-least-once):
    # a subscriber drops it by seq. A second result for a file would have another seq.
    got = sorted({(r["source_id"], r["seq"]) for r in results(sub.on("/result"))})
    twice = sorted({n for n, _ in got if sum(m == n for m, _ in got) > 1})
    assert not twice, [(n, seq) for n, seq in got if n in twice]
    assert [n for n, _ in got] == names


@pytest.mark.e2e
def test_a_retained_request_is_answered_once_across_restarts(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    images, _ = sample_images(bundle)
    pub = publisher(broker.port, "retainer")
    pub.publish(f"{INFER}/kept", png_bytes(images[2]), qos=1, retain=True).wait_for_publish(5)
    pub.disconnect()
    sub = Subscriber(broker.port)
    agent = Agent(bundle, broker.port, tmp_path, "source.kind=mqtt")
    sub.wait_for(lambda: bool(sub.on("/result")), 60, "the retained request's answer")
    stop(agent)
    agent = Agent(bundle, broker.port, tmp_path, "source.kind=mqtt")
    wait(lambda: "already answered" in agent.output(), 60, "the retained copy skipped")
    time.sleep(1.0)
    stop(agent)
    sub.close()
    assert [r["request_id"] for r in results(sub.on("/result"))] == ["kept"]


@pytest.mark.e2e
@pytest.mark.parametrize("how", ["fifo", "link to /dev/zero"])
def test_a_manifest_that_is_not_a_regular_file_is_refused_not_read(
        bundle: Path, tmp_path: Path, how: str) -> None:
    """Before: `edge-agent check` hung for good reading it."""
    b = copy_bundle(bundle, tmp_path / "b")
    (b / "manifest.json").unlink()
    if how == "fifo":
        os.mkfifo(b / "manifest.json")
    else:
        (b / "manifest.json").symlink_to("/dev/zero")
    proc = run_cli("agent", "check", "--set", f"model.dir={b}", timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "not a regular file" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.e2e
@pytest.mark.parametrize("target", ["/dev/zero", "fifo"])
def test_a_config_that_is_not_a_regular_file_is_refused_not_read(
        tmp_path: Path, target: str) -> None:
    path = Path(target)
    if target == "fifo":
        path = tmp_path / "config.yaml"
        os.mkfifo(path)
    proc = run_cli("agent", "check", "--config", path, timeout=60)
    assert proc.returncode == 2 and "not a regular file" in proc.stderr, proc.stderr


@pytest.mark.e2e
def test_monitor_listen_nan_is_refused_instead_of_hanging() -> None:
    proc = run_cli("deploy.monitor.cli", "--once", "--listen", "nan", timeout=30)
    assert proc.returncode == 2 and "--listen: must be a finite number" in proc.stderr


# --- config --------------------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.parametrize("text, lines", [
    ("mqtt:\n  port: 1883\n  host: a\n  port: 1884\n", "'port' is given twice, at lines 2 and 4"),
    ("loop:\n  window_s: 5\nmqtt: {}\nloop:\n  rate_hz: 1\n", "'loop' is given twice, at lines "
                                                              "1 and 4"),
])
def test_a_key_or_section_given_twice_is_an_error_naming_both_lines(
        tmp_path: Path, text: str, lines: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    proc = run_cli("agent", "check", "--config", path, timeout=60)
    assert proc.returncode == 2 and lines in proc.stderr, proc.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("item, problem", [
    ("mqtt.host=#broker", "a '#' starts a comment"),
    ("device.id=board #2", "a '#' starts a comment"),
    ("mqtt.host=", "no value"),
    ("mqtt.username=~x", None),  # a plain string: taken
])
def test_set_values_yaml_would_read_as_a_comment_or_null_are_refused(
        bundle: Path, item: str, problem: str | None) -> None:
    proc = run_cli("agent", "check", "--set", f"model.dir={bundle}", "--set", item, timeout=120)
    if problem is None:
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode == 2 and problem in proc.stderr, proc.stderr


# --- JSON ------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_deeply_nested_json_on_a_telemetry_topic_is_counted_not_fatal(
        broker: Broker, tmp_path: Path) -> None:
    """Before: a 60 KB nested message (retained) killed --once, serve and record with a
    RecursionError, at every start until someone cleared it."""
    pub = publisher(broker.port, "nester")
    deep = nested_json(30_000)
    for kind in ("telemetry", "summary", "info"):
        # as an agent: its retained birth first (the monitor pages boards it knows)
        pub.publish(f"edgeforge/deep-{kind}/status", b"online", qos=1, retain=True) \
            .wait_for_publish(5)
        pub.publish(f"edgeforge/deep-{kind}/{kind}", deep, qos=1, retain=True) \
            .wait_for_publish(5)
    port = free_port()
    serve = background(broker.port, tmp_path, "serve", "--prometheus", f"127.0.0.1:{port}")
    record = background(broker.port, tmp_path, "--set",
                        f"monitor.history={tmp_path}/h.sqlite3", "record")
    try:
        once = monitor(broker.port, "--once", "--json", "--listen", "2")
        assert once.returncode == 0 and "Traceback" not in once.stderr, once.stderr
        rows = {r["device"]: r for r in json.loads(once.stdout)["devices"]}
        for kind in ("telemetry", "summary", "info"):
            assert rows[f"deep-{kind}"]["bad_messages"] >= 1, rows
        pub.publish("edgeforge/deep-live/telemetry", deep, qos=1).wait_for_publish(5)
        wait(lambda: metric(metrics(port), "edgeforge_bad_messages_total", "deep-live") == 1.0,
             30, "the live message counted")
        assert serve.poll() is None and record.poll() is None
    finally:
        for kind in ("telemetry", "summary", "info"):
            for topic in (kind, "status"):
                pub.publish(f"edgeforge/deep-{kind}/{topic}", b"", qos=1, retain=True) \
                    .wait_for_publish(5)
        pub.disconnect()
        for p in (serve, record):
            p.send_signal(signal.SIGINT)
            p.wait(15)


@pytest.mark.unit
@pytest.mark.parametrize("field, value, problem", [
    ("seq", 7.5, "seq must be a whole number"),
    ("device", {"a": 1}, "device must be a name"),
    ("engine", ["x"], "engine must be a name"),
    ("model_sha256", "xyz", "64 lowercase hex"),
    ("throttling", "yes", "true, false or null"),
    ("dropped_total", 1.5, "whole number"),
])
def test_telemetry_values_of_the_wrong_type_are_refused(field: str, value: Any,
                                                        problem: str) -> None:
    from deploy.monitor.fleet import Fleet
    from tests.test_bad_input_sweep import good_telemetry

    fleet = Fleet("edgeforge", 256_000, 86_400)
    msg = {**good_telemetry("typed"), field: value}
    assert fleet.ingest("edgeforge/typed/telemetry", json.dumps(msg).encode()) is None
    dev = fleet.devices["typed"]
    assert dev.bad_messages == 1 and problem in str(dev.last_problem), dev.last_problem


@pytest.mark.e2e
def test_deeply_nested_json_in_a_manifest_or_a_command_is_one_line(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    b = copy_bundle(bundle, tmp_path / "b")
    (b / "manifest.json").write_bytes(nested_json(60_000))
    proc = run_cli("agent", "check", "--set", f"model.dir={b}", timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "nests 60000 levels deep" in proc.stderr.strip().splitlines()[-1]
    sub = Subscriber(broker.port)
    agent = Agent(bundle, broker.port, tmp_path, "loop.rate_hz=50")
    pub = publisher(broker.port, "commander")
    until_answered(lambda n: pub.publish("edgeforge/testboard/cmd/set", b"probe %d" % n, qos=1)
                   .wait_for_publish(5), lambda: bool(sub.on("/cmd_result")))
    pub.publish("edgeforge/testboard/cmd/set", nested_json(60_000), qos=1).wait_for_publish(5)

    def deep() -> list[dict[str, Any]]:
        return [m for m in (json.loads(p) for p, _ in sub.on("/cmd_result"))
                if "levels deep" in m["reason"]]

    sub.wait_for(lambda: bool(deep()), 30, "the refusal")
    pub.disconnect()
    out = stop(agent)
    sub.close()
    answer = deep()[0]
    assert answer["code"] == "malformed" and "levels deep" in answer["reason"], answer
    assert "ERROR" not in out, out


# --- disk ------------------------------------------------------------------------------------

@pytest.mark.e2e
@pytest.mark.skipif(not can_mount(), reason="needs root to mount a small tmpfs (a real full "
                                            "disk)")
def test_a_spool_disk_that_fills_counts_the_lost_windows_and_recovers(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    """Before: every window was lost, "cannot rollback - no transaction is active" was the
    logged reason, the stop claimed messages stayed spooled while the table was empty, and
    the agent exited 1 with a traceback."""
    with small_filesystem(tmp_path / "disk", 600) as disk:
        sub = Subscriber(broker.port)
        agent = Agent(bundle, broker.port, tmp_path, f"spool.path={disk}/spool.db",
                      "loop.rate_hz=50", "mqtt.port=1")  # no broker: everything is spooled
        wait(lambda: agent.output().count("window ") >= 3, 60, "three windows spooled")
        filler = disk / "filler"
        with contextlib.suppress(OSError), filler.open("wb") as f:
            while True:  # until the disk is full (ENOSPC, at a write or at the close)
                f.write(bytes(16384))
                f.flush()
        wait(lambda: "cannot write" in agent.output(), 30, "the spool's one line")
        time.sleep(2.0)  # a few windows lost
        filler.unlink()
        wait(lambda: "writing again" in agent.output(), 30, "the spool writing again")
        time.sleep(1.5)
        out = stop(agent)
        sub.close()
        with sqlite3.connect(f"{disk}/spool.db") as db:
            rows = [json.loads(p) for (p,) in db.execute(
                "SELECT payload FROM outbox WHERE topic LIKE '%/telemetry' ORDER BY id")]
            kept = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    # said once each time the spool stops being able to write (it may write a little in
    # pages SQLite already has, so it can stop and start more than once)
    assert 1 <= out.count("cannot write (") <= out.count("writing again") + 1, out
    assert "no transaction is active" not in out
    lost = [line for line in out.splitlines() if "spool cannot write" in line]
    assert lost, out
    seqs = [m["seq"] for m in rows]
    gaps = sum(b - a - 1 for a, b in zip(seqs, seqs[1:], strict=False))
    assert gaps >= len(lost) and rows[-1]["dropped_total"] >= len(lost), (seqs, len(lost))
    if "stay spooled" in out:
        claimed = int(out.split(" message(s) stay spooled")[0].rsplit(" ", 1)[1])
        assert claimed == kept, (claimed, kept)


@pytest.mark.e2e
def test_sigterm_while_reading_a_fifo_in_the_folder_is_a_clean_stop(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    """A FIFO named like an image is not a regular file: left alone, and the agent stops."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    os.mkfifo(inbox / "pipe.png")
    names = write_pngs(bundle, inbox, 1)
    aged(inbox / names[0])
    sub = Subscriber(broker.port)
    agent = Agent(bundle, broker.port, tmp_path, "source.kind=folder", f"source.path={inbox}",
                  "source.poll_s=0.2")
    sub.wait_for(lambda: bool(sub.on("/result")), 60, "the image's result")
    stop(agent)
    sub.close()
    assert [r["source_id"] for r in results(sub.on("/result"))] == names
    assert (inbox / "pipe.png").exists()



@pytest.mark.e2e
def test_a_file_closed_half_written_is_tried_again_when_complete_not_failed(
        bundle: Path, broker: Broker, tmp_path: Path) -> None:
    """A writer that closes the file half written and appends the rest later: the first
    look finds it truncated while it is young, so it is tried again, not failed."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    images, _ = sample_images(bundle)
    data = png_bytes(images[4])
    sub = Subscriber(broker.port)
    agent = Agent(bundle, broker.port, tmp_path, "source.kind=folder", f"source.path={inbox}",
                  "source.poll_s=0.2")
    wait(lambda: "(inotify)" in agent.output(), 60, "the folder watched through inotify")
    (inbox / "two-part.png").write_bytes(data[: len(data) // 2])  # closed: taken at once
    wait(lambda: "not usable yet" in agent.output(), 30, "the first, truncated look")
    with (inbox / "two-part.png").open("ab") as f:
        f.write(data[len(data) // 2:])
    sub.wait_for(lambda: bool(sub.on("/result")), 30, "the complete file's result")
    time.sleep(0.5)
    stop(agent)
    sub.close()
    got = results(sub.on("/result"))
    assert [r["source_id"] for r in got] == ["two-part.png"] and "error" not in got[0]
    assert got[0]["top"] == host_top(bundle, [data])[got[0]["engine"]][0]
    assert not (inbox / "failed" / "two-part.png").exists()
