#!/usr/bin/env bash
# Build (or reuse) an emulated arm64 Raspberry Pi: a Debian bookworm arm64 root with
# Python 3.11, and the agent installed the way a board installs it (the project's wheel and
# its aarch64 dependencies, torch from the runtime matrix), to be run by qemu-aarch64-static.
#
#   bash deploy/emulated-board/build-root.sh [ROOT]        (default build/arm64-root)
#
# The Debian part and the third-party wheels are kept between runs (a stamp file records
# what was installed); the project's own wheel is reinstalled every time. Fake
# /sys/devices/system/cpu and /proc/cpuinfo files are added by prove_arm.py per CPU model:
# without /sys, QNNPACK fails to initialise; with the host's x86 /sys, torch segfaults.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(realpath -m "${1:-build/arm64-root}")
python=${PYTHON:-.venv/bin/python}

missing=()
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || { echo "build-root: install ${missing[*]} (apt-get) first" >&2; exit 1; }
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

# The board's packages: torch from the runtime matrix, the agent's dependencies, and numpy
# (torch warns on every import without it).
torch_spec=$("$python" -m agent.runtime recommend --machine aarch64)
packages=("$torch_spec" pyyaml psutil paho-mqtt numpy
          filelock typing-extensions sympy mpmath networkx jinja2 markupsafe fsspec)
stamp="$root/.edgeforge-root"
want="bookworm arm64 python3 | ${packages[*]}"

if [ ! -x "$root/usr/bin/python3.11" ]; then
    echo "build-root: debootstrap arm64 bookworm into $root"
    rm -rf "$root"
    mkdir -p "$(dirname "$root")"
    debootstrap --foreign --arch=arm64 --variant=minbase --include=python3 bookworm "$root" \
        http://deb.debian.org/debian >"$root.debootstrap.log" 2>&1 \
        || { tail -20 "$root.debootstrap.log" >&2; exit 1; }
    # --foreign unpacks only the required set; unpack the rest (python3 and its libraries).
    for deb in "$root"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$root"; done
    rm -f "$stamp"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "build-root: aarch64 wheels: ${packages[*]}"
    rm -rf "$root/opt/edgeforge/lib"
    # Host pip judges markers for the host: resolve nothing (--no-deps), list everything.
    "$python" -m pip install --quiet --disable-pip-version-check --no-deps \
        --target "$root/opt/edgeforge/lib" --platform manylinux_2_28_aarch64 \
        --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 \
        --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
        "${packages[@]}"
    echo "$want" >"$stamp"
fi
wheels=$(mktemp -d)
"$python" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$wheels" .
"$python" -m pip install --quiet --disable-pip-version-check --no-deps --upgrade \
    --target "$root/opt/edgeforge/lib" "$wheels"/edgeforge-*.whl
rm -rf "$wheels"
echo "build-root: ready: $root ($(du -sh "$root/opt/edgeforge/lib" | cut -f1) of Python packages)"
