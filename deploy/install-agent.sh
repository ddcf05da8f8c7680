#!/usr/bin/env bash
# Install the edgeforge agent as a systemd service on this board (Raspberry Pi OS or Debian,
# arm64), idempotently, from a folder that `edge-deploy render` wrote on your workstation:
#
#   edge-deploy render --device-id pi1 --bundle models --out pi1      # on the workstation
#   scp -r pi1 pi@pi1:                                                # copy it over
#   sudo bash pi1/install-agent.sh [--profile torch|onnx|both] [--torch SPEC] [--extras LIST]
#                                  [--no-start]                                   # on the board
#
# The folder holds the agent's source alone (src.tar.gz: agent/ and its pyproject.toml, none
# of the optimizer or the operator tools), this board's config.yaml, the fleet's signing.pub,
# edge-agent.service and the signed bundle. The script creates the system user "edgeforge", a
# virtual environment in /opt/edgeforge/venv with the profile's runtimes (the runtime matrix's
# picks for this board, agent/torch_matrix.py: torch==2.9.1 and onnxruntime==1.32.0 on aarch64;
# --torch SPEC for another torch) and the agent, copies
# the config to /etc/edgeforge/config.yaml (kept if one exists), activates the bundle into
# the versioned store /var/lib/edgeforge/models (signature, sha256 and the on-board check
# before `current` switches: `edge-agent activate`), then installs and starts the unit. It is
# what `edge-deploy flash` does over SSH.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

torch_spec="" start=1
# The board's input libraries (agent extras): what `edge-deploy render --extras` chose, kept
# in release.json; --extras overrides it (images, video, both comma-separated, or none).
extras=$(sed -n 's/^ *"extras": "\([a-z,]*\)".*/\1/p' "$here/release.json" 2>/dev/null || true)
# The board's engines' runtimes: torch (TorchScript), onnx (ONNX Runtime, no torch at all) or
# both (the agent times them on this board and runs the faster); render --profile, kept in
# release.json, or --profile.
profile=$(sed -n 's/^ *"profile": "\([a-z]*\)".*/\1/p' "$here/release.json" 2>/dev/null || true)
while [ $# -gt 0 ]; do
    case "$1" in
        --torch) torch_spec=$2; shift 2 ;;
        --profile) profile=$2; shift 2 ;;
        --extras) extras=$2; shift 2 ;;
        --no-start) start=0; shift ;;
        *) echo "install-agent: unknown argument $1 (see the usage at the top of this file)" >&2
           exit 2 ;;
    esac
done
die() { echo "install-agent: $*" >&2; exit 2; }
profile=${profile:-both}
case "$profile" in torch|onnx|both) ;; *) die "--profile $profile: one of torch, onnx, both" ;; esac
[ "$(id -u)" = 0 ] || die "run as root (sudo bash $0 ...)"
for f in src.tar.gz config.yaml signing.pub edge-agent.service bundle/manifest.json; do
    [ -e "$here/$f" ] || die "$here/$f is missing: run this from the folder edge-deploy render \
wrote (edge-deploy render --device-id ID --out DIR), copied whole"
done

echo "== packages"
if ! { command -v python3 >/dev/null && python3 -c "import ensurepip, venv" 2>/dev/null; }; then
    apt-get update -qq && apt-get install -y -qq python3-venv python3-pip
fi

echo "== user edgeforge"
id -u edgeforge >/dev/null 2>&1 \
    || useradd --system --home-dir /var/lib/edgeforge --shell /usr/sbin/nologin edgeforge

echo "== /opt/edgeforge/venv"
install -d -m 0755 /opt/edgeforge
rm -rf /opt/edgeforge/src.new && mkdir /opt/edgeforge/src.new
tar xzf "$here/src.tar.gz" -C /opt/edgeforge/src.new
rm -rf /opt/edgeforge/src && mv /opt/edgeforge/src.new /opt/edgeforge/src
cd /opt/edgeforge/src
# PyPI's newest aarch64 torch is a CUDA build (GBs) and 2.10.0 crashes on a Pi 4: take the
# matrix's picks. agent.torch_matrix is stdlib-only, so it runs before anything is installed.
specs=$(python3 -m agent.torch_matrix recommend --profile "$profile" --torch "$torch_spec") \
    || die "no known-good runtime for $(uname -m): pass --torch SPEC, or --profile onnx"
[ -x /opt/edgeforge/venv/bin/python ] || python3 -m venv /opt/edgeforge/venv
# shellcheck disable=SC2086  # one pip spec per word
/opt/edgeforge/venv/bin/pip install --quiet --disable-pip-version-check $specs numpy
echo "$specs" >/opt/edgeforge/torch-constraint.txt  # keep those while pip resolves the rest
# A board moved to another profile sheds the runtime it no longer uses (onnx: no torch at all).
case "$profile" in
    onnx) unused=torch ;;
    torch) unused=onnxruntime ;;
    *) unused="" ;;
esac
[ -z "$unused" ] || /opt/edgeforge/venv/bin/pip uninstall --quiet --yes "$unused" 2>/dev/null || true
[ "$extras" = none ] && extras=""
case "$extras" in *[!a-z,]*) die "--extras $extras: a comma-separated list of images, video" ;; esac
/opt/edgeforge/venv/bin/pip install --quiet --disable-pip-version-check \
    -c /opt/edgeforge/torch-constraint.txt ".${extras:+[$extras]}"
/opt/edgeforge/venv/bin/python -m agent.torch_matrix status

echo "== config and signing key"
install -d -m 0755 /etc/edgeforge
# 0600, the agent's own: it holds this board's broker password (edge-deploy render).
[ -f /etc/edgeforge/config.yaml ] || install -m 0600 -o edgeforge -g edgeforge "$here/config.yaml" \
    /etc/edgeforge/config.yaml
install -m 0644 "$here/signing.pub" /etc/edgeforge/signing.pub

echo "== edge-agent activate (signature, sha256, on-board check, then switch)"
install -d -m 0750 -o edgeforge -g edgeforge /var/lib/edgeforge
/opt/edgeforge/venv/bin/edge-agent activate "$here/bundle" --config /etc/edgeforge/config.yaml
chown -R edgeforge:edgeforge /var/lib/edgeforge

echo "== systemd unit"
install -d /etc/systemd/system
install -m 0644 "$here/edge-agent.service" /etc/systemd/system/edge-agent.service
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
