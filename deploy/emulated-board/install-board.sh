#!/usr/bin/env bash
# Run the README's Pi install (edge-deploy render, then its install-agent.sh) as written, on
# an emulated board: a full Debian bookworm arm64 root entered with chroot, qemu-aarch64
# registered with binfmt_misc, QEMU_CPU set to the board's core.
#
#   bash deploy/emulated-board/install-board.sh BUNDLE [CPU] [ROOT]
#        (CPU: cortex-a72 (default) or cortex-a76; ROOT: default build/arm64-board)
#   bash deploy/emulated-board/install-board.sh --root-only [ROOT]
#        (only make the Debian root: CI starts this first, beside the setup and the tests;
#        a second run waits for it on ROOT.lock instead of making the root again)
#
# The Debian root is kept between runs; the rendered folder and the bundle are copied in
# afresh and the installer runs every time (it is idempotent). Two things are this workplace's, not a
# Pi's: the host's CA bundle is copied in (PyPI is reached through a TLS proxy here), and
# /proc/cpuinfo and /sys/devices/system/cpu are faked for the core (tests/prove_arm.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
root_only=0
if [ "${1:-}" = --root-only ]; then
    root_only=1
    shift
    set -- "" cortex-a72 "${1:-build/arm64-board}"
fi
bundle=${1:+$(realpath "$1")}
cpu=${2:-cortex-a72}
root=$(realpath -m "${3:-build/arm64-board}")
python=${PYTHON:-.venv/bin/python}

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
[ -e /proc/sys/fs/binfmt_misc/register ] \
    || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
    || { echo "install-board: cannot mount binfmt_misc (needs root)" >&2; exit 1; }
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] \
    || { echo "install-board: qemu-aarch64 is not registered with binfmt_misc" >&2; exit 1; }

mkdir -p "$(dirname "$root")"
exec 9>"$root.lock"
flock 9  # another run making this root: wait for it
if [ ! -e "$root/.edgeforge-board" ]; then
    echo "install-board: debootstrap arm64 bookworm into $root (emulated second stage)"
    rm -rf "$root"
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$root" http://deb.debian.org/debian >"$root.debootstrap.log" 2>&1 \
        || { tail -20 "$root.debootstrap.log" >&2; exit 1; }
    touch "$root/.edgeforge-board"
fi
flock -u 9
if [ "$root_only" = 1 ]; then
    echo "install-board: the Debian root $root is ready"
    exit 0
fi
cp /etc/resolv.conf "$root/etc/resolv.conf"
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
"$python" -c "import sys; sys.path.insert(0, '.'); from pathlib import Path; \
from tests.prove_arm import fake_cpu_files; fake_cpu_files(Path('$root'), '$cpu')"

rm -rf "$root/root/edgeforge" "$root/root/bundle"
# The proof's own checks get the bundle as built (unsigned, no key on the board's command
# line); the install gets it signed by the emulated fleet's key, as render does for a Pi.
cp -r "$bundle" "$root/root/bundle"
key="$root.signing.key"
[ -f "$key" ] || "$python" -m deploy.cli keygen --key "$key" >/dev/null
"$python" -m deploy.cli render --device-id "emulated-$cpu" --bundle "$bundle" --key "$key" \
    --out "$root/root/edgeforge" >/dev/null

echo "install-board: sudo bash install-agent.sh (from edge-deploy render) on $cpu, as written"
chroot "$root" /usr/bin/env -i QEMU_CPU="$cpu" PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    LANG=C.UTF-8 PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    bash /root/edgeforge/install-agent.sh --no-start
for f in /etc/edgeforge/config.yaml /var/lib/edgeforge/models/current/manifest.json \
         /etc/systemd/system/multi-user.target.wants/edge-agent.service \
         /opt/edgeforge/venv/bin/edge-agent; do
    [ -e "$root$f" ] || { echo "install-board: FAIL: $f missing after the install" >&2; exit 1; }
done
echo "install-board: PASS: installed, checked and enabled on emulated $cpu"
