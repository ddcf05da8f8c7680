#!/usr/bin/env bash
# Install the edgeforge agent as a systemd service on this board (Raspberry Pi OS or Debian,
# arm64), idempotently. Run it on the board, as root, from a copy of the project:
#
#   sudo bash deploy/install-agent.sh --bundle models [--config deploy/config.yaml]
#                                     [--torch SPEC] [--no-start]
#
# It creates the system user "edgeforge", a virtual environment in /opt/edgeforge/venv with
# torch (the runtime matrix's pick for this board, agent/runtime.py: torch==2.9.1 on
# aarch64; or --torch SPEC) and edgeforge, copies the config to
# /etc/edgeforge/config.yaml (kept if one exists) and the bundle to /var/lib/edgeforge/models,
# checks the bundle on this board (edge-agent check), then installs and starts the unit.
set -euo pipefail
cd "$(dirname "$0")/.."

bundle="" config="deploy/config.yaml" torch_spec="" start=1
while [ $# -gt 0 ]; do
    case "$1" in
        --bundle) bundle=$2; shift 2 ;;
        --config) config=$2; shift 2 ;;
        --torch) torch_spec=$2; shift 2 ;;
        --no-start) start=0; shift ;;
        *) echo "install-agent: unknown argument $1 (see the usage at the top of this file)" >&2
           exit 2 ;;
    esac
done
die() { echo "install-agent: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "run as root (sudo bash deploy/install-agent.sh ...)"
[ -n "$bundle" ] || die "--bundle DIR is required: the folder edge-optimize wrote (models/)"
[ -f "$bundle/manifest.json" ] || die "$bundle has no manifest.json: copy the whole bundle"
[ -f "$config" ] || die "$config: no such config file"

echo "== packages"
command -v python3 >/dev/null && python3 -c "import ensurepip, venv" 2>/dev/null \
    || { apt-get update -qq && apt-get install -y -qq python3-venv python3-pip; }

echo "== user edgeforge"
id -u edgeforge >/dev/null 2>&1 \
    || useradd --system --home-dir /var/lib/edgeforge --shell /usr/sbin/nologin edgeforge

echo "== /opt/edgeforge/venv"
# PyPI's newest aarch64 torch is a CUDA build (GBs) and 2.10.0 crashes on a Pi 4: take the
# matrix's pick. agent.runtime is stdlib-only, so it runs before anything is installed.
[ -n "$torch_spec" ] || torch_spec=$(python3 -m agent.runtime recommend) \
    || die "no known-good torch for $(uname -m): pass --torch SPEC"
[ -x /opt/edgeforge/venv/bin/python ] || python3 -m venv /opt/edgeforge/venv
# numpy: torch warns on every import without it.
/opt/edgeforge/venv/bin/pip install --quiet --disable-pip-version-check "$torch_spec" numpy
constraints=$(mktemp)
echo "$torch_spec" >"$constraints"  # keep that torch while pip resolves edgeforge's needs
/opt/edgeforge/venv/bin/pip install --quiet --disable-pip-version-check -c "$constraints" .
rm -f "$constraints"
/opt/edgeforge/venv/bin/python -m agent.runtime status

echo "== config and bundle"
install -d -m 0755 /etc/edgeforge
[ -f /etc/edgeforge/config.yaml ] || install -m 0644 "$config" /etc/edgeforge/config.yaml
install -d -m 0750 -o edgeforge -g edgeforge /var/lib/edgeforge
rm -rf /var/lib/edgeforge/models.new
cp -r "$bundle" /var/lib/edgeforge/models.new
chown -R edgeforge:edgeforge /var/lib/edgeforge/models.new
rm -rf /var/lib/edgeforge/models.old
[ ! -d /var/lib/edgeforge/models ] || mv /var/lib/edgeforge/models /var/lib/edgeforge/models.old
mv /var/lib/edgeforge/models.new /var/lib/edgeforge/models

echo "== edge-agent check"
runuser -u edgeforge -- /opt/edgeforge/venv/bin/edge-agent check \
    --config /etc/edgeforge/config.yaml

echo "== systemd unit"
install -d /etc/systemd/system
install -m 0644 deploy/edge-agent.service /etc/systemd/system/edge-agent.service
if [ ! -d /run/systemd/system ]; then
    # An image build or a chroot: enable it for the next boot without a running systemd.
    mkdir -p /etc/systemd/system/multi-user.target.wants
    ln -sf ../edge-agent.service /etc/systemd/system/multi-user.target.wants/edge-agent.service
    echo "systemd is not running here: edge-agent.service installed and enabled for next boot"
else
    systemctl daemon-reload
    if [ "$start" = 1 ]; then
        systemctl enable --now edge-agent.service
        systemctl --no-pager status edge-agent.service | head -5 || true
    fi
fi
echo "installed: journalctl -u edge-agent -f shows one line per window"
