#!/usr/bin/env bash
# Set up everything edgeforge needs on a fresh Debian/Ubuntu machine, idempotently:
# Debian's mosquitto (the tests' real broker), systemd-analyze (unit file checks),
# openssl (test certificates), OpenSSH (edge-deploy flash and its test sshd), the
# Prometheus and shell linters (promtool, shellcheck), and
# a virtual environment in .venv with edgeforge, its host extras and the test tools.
# torch and torchvision are pinned through .ci/constraints.txt (PyPI's default torch build,
# which runs on CPU and is the one torchvision's operators load with); a board picks its own
# torch and never needs torchvision.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

missing=()
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v mosquitto_sub >/dev/null || missing+=(mosquitto-clients)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v openssl >/dev/null || missing+=(openssl)  # the TLS test's certificates
# edge-deploy flash uses the system's ssh; its tests start a real sshd on loopback.
command -v ssh >/dev/null || missing+=(openssh-client)
command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
# The ecosystems' own linters, run by the tests and CI: promtool (Prometheus) on edge-monitor's
# metrics, shellcheck on the installers.
command -v promtool >/dev/null || missing+=(prometheus)
command -v shellcheck >/dev/null || missing+=(shellcheck)
# The source tests make video files and serve a stream with FFmpeg.
command -v ffmpeg >/dev/null || missing+=(ffmpeg)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then sudo=(); elif sudo -n true 2>/dev/null; then sudo=(sudo -n)
    else
        echo "setup: missing ${missing[*]}: run 'sudo apt-get install ${missing[*]}' and retry" >&2
        exit 1
    fi
    echo "setup: installing ${missing[*]} from Debian's packages"
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -c .ci/constraints.txt -e '.[dev]'
.venv/bin/python -c "import torch, torchvision, yaml, psutil, paho.mqtt, cryptography, tqdm, matplotlib, PIL, av, watchdog" \
    || { echo "setup failed: dependencies did not import" >&2; exit 1; }
