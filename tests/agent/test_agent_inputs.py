"""edge-agent run and bench on bad input, stats on a board's sysfs, and the benchmark's output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.manifest import BOARD_MODEL, EXECUTORCH_MODEL, ONNX_MODEL, sha256_of
from agent.stats import ResourceStats
from tests.support import copy_bundle, edit_manifest, run_cli


def run(bundle: Path, tmp_path: Path, *overrides: str):  # type: ignore[no-untyped-def]
    args = ["run", "--set", f"model.dir={bundle}", "--set", f"spool.path={tmp_path}/s.db",
            "--set", "mqtt.port=1", "--duration", "1"]
    for item in overrides:
        args += ["--set", item]
    return run_cli("agent", *args, timeout=120)


def one_line_exit_2(proc, *needles: str) -> None:  # type: ignore[no-untyped-def]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert any(all(n in line for n in needles) for line in lines), proc.stderr


@pytest.mark.e2e
def test_unknown_config_key_is_named(bundle: Path, tmp_path: Path) -> None:
    one_line_exit_2(run(bundle, tmp_path, "loop.rate=5"), "ConfigError", "loop.rate",
                    "unknown key")


@pytest.mark.e2e
def test_invalid_config_value_is_named(bundle: Path, tmp_path: Path) -> None:
    one_line_exit_2(run(bundle, tmp_path, "mqtt.qos=3"), "ConfigError", "mqtt.qos",
                    "must be 0, 1 or 2")


@pytest.mark.e2e
def test_missing_model_file(bundle: Path, tmp_path: Path) -> None:
    b = copy_bundle(bundle, tmp_path)
    (b / BOARD_MODEL).unlink()
    one_line_exit_2(run(b, tmp_path), "BundleError", "missing from the bundle")


@pytest.mark.e2e
def test_sha256_mismatch_is_refused_before_loading(bundle: Path, tmp_path: Path) -> None:
    b = copy_bundle(bundle, tmp_path)
    with (b / BOARD_MODEL).open("ab") as f:
        f.write(b"\0")
    one_line_exit_2(run(b, tmp_path), "BundleError", "sha256", "refusing to load")


def replace_file(bundle: Path, name: str, data: bytes) -> None:
    """Overwrite a bundle file and give the manifest its new sha256 (a host-side bug)."""
    (bundle / name).write_bytes(data)
    m = json.loads((bundle / "manifest.json").read_text())
    m["files"][name]["sha256"] = sha256_of(bundle / name)
    (bundle / "manifest.json").write_text(json.dumps(m))


@pytest.mark.e2e
def test_a_file_that_is_not_torchscript(bundle: Path, tmp_path: Path) -> None:
    b = copy_bundle(bundle, tmp_path)
    replace_file(b, BOARD_MODEL, b"PK\x03\x04 not a TorchScript archive")
    one_line_exit_2(run(b, tmp_path, "model.engine=torchscript"), "BundleError",
                    "not a loadable TorchScript file")


@pytest.mark.e2e
def test_a_file_that_is_not_onnx(bundle: Path, tmp_path: Path) -> None:
    b = copy_bundle(bundle, tmp_path)
    replace_file(b, ONNX_MODEL, b"\x08\x07 not an ONNX model")
    one_line_exit_2(run(b, tmp_path, "model.engine=onnxruntime"), "BundleError",
                    "engine onnxruntime cannot run", "not a loadable ONNX model")


@pytest.mark.e2e
def test_auto_runs_the_engine_that_passes_and_says_why_the_others_failed(
        bundle: Path, tmp_path: Path) -> None:
    b = copy_bundle(bundle, tmp_path)
    replace_file(b, ONNX_MODEL, b"\x08\x07 not an ONNX model")
    replace_file(b, EXECUTORCH_MODEL, b"not an ExecuTorch program")
    proc = run(b, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "engine onnxruntime 1." in proc.stderr and "failed" in proc.stderr
    assert "not a loadable ONNX model" in proc.stderr
    assert "engine executorch 1." in proc.stderr and "not an ExecuTorch program (no ETnn " \
        "file identifier" in proc.stderr
    assert "running torchscript" in proc.stderr and "the only proven engine" in proc.stderr


@pytest.mark.e2e
def test_an_engine_the_bundle_lacks_is_named(bundle: Path, tmp_path: Path) -> None:
    b = copy_bundle(bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    del m["engines"]["onnxruntime"]
    (b / "manifest.json").write_text(json.dumps(m))
    one_line_exit_2(run(b, tmp_path, "model.engine=onnxruntime"), "BundleError",
                    "has no onnxruntime model", "set model.engine to auto")


@pytest.mark.e2e
def test_wrong_input_shape(bundle: Path, tmp_path: Path) -> None:
    b = copy_bundle(bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    edit_manifest(b, input={**m["input"], "shape": [3, 64, 64]})
    one_line_exit_2(run(b, tmp_path), "BundleError", "does not take the manifest's input shape")


@pytest.mark.e2e
def test_engine_not_available(bundle: Path, tmp_path: Path) -> None:
    b = copy_bundle(bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    m["engines"]["torchscript"]["quantized_engine"] = "armcl"
    (b / "manifest.json").write_text(json.dumps(m))
    one_line_exit_2(run(b, tmp_path, "model.engine=torchscript"), "BundleError",
                    "'armcl' is not available", "qnnpack")


@pytest.mark.e2e
def test_tls_files_that_do_not_exist(bundle: Path, tmp_path: Path) -> None:
    proc = run(bundle, tmp_path, "mqtt.tls=true", f"mqtt.ca_file={tmp_path}/nope.pem")
    one_line_exit_2(proc, "ConfigError", "mqtt.tls", "nope.pem")
    assert not list(tmp_path.glob("s.db.corrupt*"))


@pytest.mark.e2e
def test_bad_cli_argument(bundle: Path) -> None:
    proc = run_cli("agent", "run", "--duration", "-3")
    assert proc.returncode == 2 and "--duration: must be a finite number > 0, got -3" in proc.stderr


@pytest.mark.e2e
def test_bench_prints_a_table_and_json(bundle: Path) -> None:
    proc = run_cli("agent", "bench", "--set", f"model.dir={bundle}", "--batch-sizes", "1,4",
                   "--iters", "30", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    engines = ["torchscript", "onnxruntime", "executorch"]
    assert [(r["batch_size"], r["engine"]) for r in result["rows"]] == [
        (b, e) for b in (1, 4) for e in engines]
    for r in result["rows"]:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["throughput_ips"] == pytest.approx(r["batch_size"] * 1000 / r["mean_ms"])
    assert [e["status"] for e in result["engines"]] == ["proven"] * 3
    assert result["engine"] in engines
    table = run_cli("agent", "bench", "--set", f"model.dir={bundle}", "--iters", "20")
    assert table.returncode == 0 and "p50 ms" in table.stdout
    lines = table.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[1:4]] == engines
    assert "proven" in lines[1] and all("bit-exact" in line for line in lines[1:4])
    assert [line.split()[0] for line in lines[5:8]] == engines
    assert len(lines) == 9 and lines[-1].startswith(f"runs: {result['engine']}")


def fake_pi_sysfs(root: Path, throttled: str) -> Path:
    """A fake of a Raspberry Pi 4's sysfs (no Pi here): thermal zone, cpufreq, firmware."""
    zone = root / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("61234\n")
    freq = root / "sys/devices/system/cpu/cpu0/cpufreq"
    freq.mkdir(parents=True)
    (freq / "scaling_cur_freq").write_text("1500000\n")
    fw = root / "sys/devices/platform/soc/soc:firmware"
    fw.mkdir(parents=True)
    (fw / "get_throttled").write_text(throttled)
    return root


@pytest.mark.unit
def test_stats_read_a_pi_s_temperature_frequency_and_throttling_flags(tmp_path: Path) -> None:
    stats = ResourceStats(root=fake_pi_sysfs(tmp_path, "50005\n"), vcgencmd=None)
    stats.start()
    s = stats.sample()
    assert s["soc_temp_c"] == 61.2 and s["cpu_freq_mhz"] == 1500.0
    assert s["throttled"] == 0x50005
    assert s["under_voltage"] is True and s["freq_capped"] is False and s["throttling"] is True
    assert s["rss_mb"] > 10 and s["load_1m"] >= 0


@pytest.mark.unit
def test_stats_are_null_where_the_board_has_no_such_sensor(tmp_path: Path) -> None:
    s = ResourceStats(root=tmp_path, vcgencmd=None).sample()
    assert s["soc_temp_c"] is None and s["cpu_freq_mhz"] is None and s["throttled"] is None
    assert s["under_voltage"] is None
