#!/usr/bin/env bash
# Run the README's Pi install (edge-deploy render, then its install-agent.sh) as written, on
# an emulated board: a full Debian arm64 root entered with chroot, qemu-aarch64 registered
# with binfmt_misc, QEMU_CPU set to the board's core.
#
#   bash deploy/emulated-board/install-board.sh BUNDLE [CPU] [ROOT]
#        (CPU: cortex-a72 (default) or cortex-a76; ROOT: default build/arm64-$SUITE)
#   bash deploy/emulated-board/install-board.sh --root-only [ROOT]
#        (only make the Debian root: CI starts this first, beside the setup and the tests;
#        a second run waits for it on ROOT.lock instead of making the root again)
#
# Environment: SUITE=bookworm (Python 3.11; the default) or trixie (Python 3.13, what
# Raspberry Pi OS is based on now); PROFILE=both (default), torch or onnx, the installer's
# --profile; ROOT_CACHE (default /var/cache/edgeforge), where fresh roots are kept as tarballs.
#
# The Debian root is kept between runs; the rendered folder and the bundle are copied in
# afresh and the installer runs every time (it is idempotent). Four things are this
# workplace's, not a Pi's, all for emulated time: the board's pip installs from
# ROOT/root/wheels, the wheels PyPI has for the root's Python and aarch64, downloaded by the host's pip (natively: the same files,
# without minutes of emulated TLS; so the root needs no CA certificates, and debootstrap
# skips configuring them under emulation); the runtimes of the profile (torch, onnxruntime
# and their dependencies) are unpacked into the board's venv by the host's pip, and the
# installer's pip finds them there (below); the board's pip does not byte-compile
# (PIP_NO_COMPILE: Python compiles what it imports, once, on first use); and /proc/cpuinfo
# and /sys/devices/system/cpu are faked for the core (tests/prove_arm.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
root_only=0
if [ "${1:-}" = --root-only ]; then
    root_only=1
    shift
    set -- "" cortex-a72 "${1:-}"
fi
bundle=${1:+$(realpath "$1")}
cpu=${2:-cortex-a72}
root=$(realpath -m "${3:-build/arm64-${SUITE:-bookworm}}")
python=${PYTHON:-.venv/bin/python}
suite=${SUITE:-bookworm}
profile=${PROFILE:-both}

missing=()
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
command -v update-binfmts >/dev/null || missing+=(binfmt-support)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || { echo "install-board: install ${missing[*]} first" >&2; exit 1; }
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi
# Two runs start together in CI (one per release): the one that loses the race to mount
# finds it mounted.
[ -e /proc/sys/fs/binfmt_misc/register ] \
    || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null \
    || [ -e /proc/sys/fs/binfmt_misc/register ] \
    || { echo "install-board: cannot mount binfmt_misc (needs root)" >&2; exit 1; }
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] \
    || { echo "install-board: qemu-aarch64 is not registered with binfmt_misc" >&2; exit 1; }

mkdir -p "$(dirname "$root")"
exec 9>"$root.lock"
flock 9  # another run making this root: wait for it
# A fresh root is also kept as a tarball outside the checkout (ROOT_CACHE), so a machine that
# runs CI again unpacks it in seconds instead of minutes of emulated debootstrap; one older
# than a week is made anew (Debian's updates).
cache=${ROOT_CACHE:-/var/cache/edgeforge}
tarball="$cache/arm64-$suite.tar"
if [ ! -e "$root/.edgeforge-board" ]; then
    rm -rf "$root"
    if [ -f "$tarball" ] && [ -n "$(find "$tarball" -mtime -7)" ]; then
        echo "install-board: the Debian root from $tarball (made within a week)"
        mkdir -p "$root"
        tar -xpf "$tarball" --numeric-owner -C "$root"
    else
        echo "install-board: debootstrap arm64 $suite into $root (emulated second stage)"
        debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv \
            "$suite" "$root" http://deb.debian.org/debian >"$root.debootstrap.log" 2>&1 \
            || { tail -20 "$root.debootstrap.log" >&2; exit 1; }
        touch "$root/.edgeforge-board"
        { mkdir -p "$cache" && tar -cpf "$tarball.tmp" --numeric-owner -C "$root" . \
              && mv "$tarball.tmp" "$tarball"; } \
            || echo "install-board: cannot keep the root in $cache (next time: debootstrap)" >&2
    fi
fi
flock -u 9
if [ "$root_only" = 1 ]; then
    echo "install-board: the Debian root $root is ready"
    exit 0
fi
"$python" -c "import sys; sys.path.insert(0, '.'); from pathlib import Path; \
from tests.prove_arm import fake_cpu_files; fake_cpu_files(Path('$root'), '$cpu')"

# The board's wheels, fetched by the host's pip for the root's Python (see the top). pip
# judges dependency markers by the host it runs on (x86: torch's CUDA wheels), so the list is
# explicit, --no-deps: the runtimes, their dependencies, the agent's and its extras', and
# setuptools to build the agent. A missing one stops the board's pip with its name.
pyver=$(chroot "$root" /usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
mapfile -t specs < <("$python" -m agent.torch_matrix recommend --profile both --machine aarch64)
"$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 \
    --platform manylinux2014_aarch64 --platform any --python-version "$pyver" \
    --implementation cp --abi "cp${pyver/./}" --abi abi3 --abi none -d "$root/root/wheels" \
    "${specs[@]}" filelock typing-extensions sympy 'mpmath<1.4' networkx jinja2 markupsafe fsspec \
    flatbuffers packaging protobuf numpy pyyaml psutil 'paho-mqtt>=2,<3' cryptography cffi \
    pycparser pillow watchdog 'setuptools>=77' 2>"$root.pip.log" \
    || { grep -v "^WARNING: Location" "$root.pip.log" >&2
         echo "install-board: cannot download the board's wheels for Python $pyver" >&2; exit 1; }

# The profile's runtimes, unpacked into the board's venv by the host's pip (natively; the
# same wheels, see the top): under emulation, pip spent most of ten minutes unzipping and
# hashing torch's 104 MB. The installer then runs as written; its pip finds them installed.
# Where the host's Python is the board's (bookworm: 3.11), the host byte-compiles them too.
mapfile -t runtimes < <("$python" -m agent.torch_matrix recommend --profile "$profile" \
    --machine aarch64)
[ -x "$root/opt/edgeforge/venv/bin/python" ] \
    || chroot "$root" /usr/bin/env -i QEMU_CPU="$cpu" PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root /usr/bin/python3 -m venv /opt/edgeforge/venv
site="$root/opt/edgeforge/venv/lib/python$pyver/site-packages"
runtime_deps=()
case "$profile" in onnx|both) runtime_deps+=(flatbuffers packaging protobuf) ;; esac
case "$profile" in torch|both) runtime_deps+=(filelock typing-extensions sympy 'mpmath<1.4' \
    networkx jinja2 markupsafe fsspec) ;; esac
host_pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
compile=--no-compile
[ "$host_pyver" = "$pyver" ] && compile=--compile
"$python" -m pip install --quiet --disable-pip-version-check --no-deps --no-index \
    --find-links "$root/root/wheels" --only-binary=:all: --platform manylinux_2_28_aarch64 \
    --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 --python-version \
    "$pyver" --implementation cp --abi "cp${pyver/./}" --abi abi3 --abi none --upgrade \
    --ignore-requires-python \
    "$compile" --target "$site" "${runtimes[@]}" numpy "${runtime_deps[@]}" \
    2>>"$root.pip.log" \
    || { grep -v "^WARNING: Location" "$root.pip.log" >&2
         echo "install-board: cannot unpack the runtimes into the board's venv" >&2; exit 1; }

rm -rf "$root/root/edgeforge" "$root/root/bundle"
# The proof's own checks get the bundle as built (unsigned, no key on the board's command
# line); the install gets it signed by the emulated fleet's key, as render does for a Pi.
cp -r "$bundle" "$root/root/bundle"
key="$(dirname "$root")/emulated-fleet.signing.key"  # one fleet: every root trusts it
[ -f "$key" ] || "$python" -m deploy.cli keygen --key "$key" >/dev/null
"$python" -m deploy.cli render --device-id "emulated-$cpu" --bundle "$bundle" --key "$key" \
    --profile "$profile" --broker-dir "$(dirname "$root")/emulated-broker" \
    --out "$root/root/edgeforge" >/dev/null

echo "install-board: sudo bash install-agent.sh (from edge-deploy render) on $cpu, Debian" \
    "$suite (Python $pyver), profile $profile, as written"
chroot "$root" /usr/bin/env -i QEMU_CPU="$cpu" PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    LANG=C.UTF-8 PIP_NO_INDEX=1 PIP_NO_COMPILE=1 \
    PIP_FIND_LINKS=/root/wheels bash /root/edgeforge/install-agent.sh --no-start
for f in /etc/edgeforge/config.yaml /var/lib/edgeforge/models/current/manifest.json \
         /etc/systemd/system/multi-user.target.wants/edge-agent.service \
         /opt/edgeforge/venv/bin/edge-agent; do
    [ -e "$root$f" ] || { echo "install-board: FAIL: $f missing after the install" >&2; exit 1; }
done
echo "install-board: PASS: installed, checked and enabled on emulated $cpu ($suite, $profile)"
