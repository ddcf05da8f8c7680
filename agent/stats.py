"""Resource stats for one telemetry window: psutil, the SoC temperature, Raspberry Pi throttling.

What a board does not expose is None (null on the wire), never a guess. The publisher thread
samples once per window, so nothing here runs on the inference loop. CPU percentages cover
the time since the previous sample (psutil's non-blocking `interval=None`).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

# Thermal zone types that are the SoC/CPU die, best first (Pi: cpu-thermal; x86: x86_pkg_temp).
_ZONE_PREFERENCE = ("cpu-thermal", "cpu_thermal", "soc-thermal", "soc_thermal", "x86_pkg_temp",
                    "cpu", "soc")
_SENSOR_PREFERENCE = ("cpu_thermal", "cpu-thermal", "soc_thermal", "coretemp", "k10temp",
                      "zenpower", "acpitz")

# Raspberry Pi firmware get_throttled bits (now): under-voltage, ARM frequency capped,
# currently throttled. Bits 16-18 say the same happened since boot.
UNDER_VOLTAGE, FREQ_CAPPED, THROTTLING = 0x1, 0x2, 0x4


class ResourceStats:
    """Samples the agent process and the board. `root` is "/" except in tests."""

    def __init__(self, root: Path = Path("/"), vcgencmd: str | None = "vcgencmd") -> None:
        self._root = root
        # psutil reads the real machine: only a fallback when `root` is the real one.
        self._psutil_fallback = root == Path("/")
        self._proc = psutil.Process()
        self._vcgencmd = shutil.which(vcgencmd) if vcgencmd else None
        self._temp_path = self._find_thermal_zone()

    def start(self) -> None:
        """Start the CPU counters, on the sampling thread (psutil keeps them per thread)."""
        self._proc.cpu_percent(None)
        psutil.cpu_percent(None)

    def sample(self) -> dict[str, Any]:
        """One reading of every stat, keyed as in the telemetry message."""
        mem = self._proc.memory_info()
        throttled = self.throttled()
        return {
            "proc_cpu_percent": round(self._proc.cpu_percent(None), 1),
            "sys_cpu_percent": round(psutil.cpu_percent(None), 1),
            "rss_mb": round(mem.rss / 1e6, 2),  # MB as the key says (10**6 bytes), not MiB
            "mem_percent": round(psutil.virtual_memory().percent, 1),
            "load_1m": round(os.getloadavg()[0], 2),
            "soc_temp_c": self.soc_temp_c(),
            "cpu_freq_mhz": self.cpu_freq_mhz(),
            "throttled": throttled,
            "under_voltage": None if throttled is None else bool(throttled & UNDER_VOLTAGE),
            "freq_capped": None if throttled is None else bool(throttled & FREQ_CAPPED),
            "throttling": None if throttled is None else bool(throttled & THROTTLING),
        }

    def _find_thermal_zone(self) -> Path | None:
        zones = sorted((self._root / "sys/class/thermal").glob("thermal_zone*"))
        typed = []
        for zone in zones:
            try:
                kind = (zone / "type").read_text().strip().lower()
            except OSError:
                continue
            if (zone / "temp").exists():
                typed.append((kind, zone / "temp"))
        for wanted in _ZONE_PREFERENCE:
            for kind, path in typed:
                if kind.startswith(wanted):
                    return path
        return typed[0][1] if len(typed) == 1 else None  # one unnamed zone: the SoC on most SBCs

    def soc_temp_c(self) -> float | None:
        """The SoC temperature in degrees C, from sysfs or psutil's sensors; None if neither."""
        if self._temp_path is not None:
            try:
                return round(int(self._temp_path.read_text().strip()) / 1000.0, 1)
            except (OSError, ValueError):
                pass
        sensors_temperatures = getattr(psutil, "sensors_temperatures", None)
        if sensors_temperatures is None or not self._psutil_fallback:
            return None
        try:
            sensors = sensors_temperatures()
        except OSError:
            return None
        for name in _SENSOR_PREFERENCE:
            if sensors.get(name):
                return round(float(sensors[name][0].current), 1)
        return None

    def cpu_freq_mhz(self) -> float | None:
        """Current CPU frequency in MHz (cpufreq sysfs, else psutil); None if not exposed."""
        path = self._root / "sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq"
        try:
            return round(int(path.read_text().strip()) / 1000.0, 1)
        except (OSError, ValueError):
            pass
        if not self._psutil_fallback:
            return None
        try:
            freq = psutil.cpu_freq()
        except (OSError, NotImplementedError):
            return None
        return round(freq.current, 1) if freq is not None and freq.current > 0 else None

    def throttled(self) -> int | None:
        """The Pi firmware's get_throttled bitmask (sysfs, else vcgencmd); None elsewhere."""
        for path in (self._root / "sys/devices/platform").glob("soc*/*firmware/get_throttled"):
            try:
                return int(path.read_text().strip(), 16)
            except (OSError, ValueError):
                continue
        if self._vcgencmd is None:
            return None
        try:
            out = subprocess.run([self._vcgencmd, "get_throttled"], capture_output=True,
                                 text=True, timeout=2, check=True).stdout
            return int(out.strip().partition("=")[2], 16)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            log.warning("vcgencmd get_throttled failed (%s); throttling will be reported as "
                        "null", exc)
            self._vcgencmd = None  # don't retry every window
            return None
