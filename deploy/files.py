"""What the operator's tools put on a board, found in the installed packages.

The unit file, the board config, the installers and the playbook are package data of
`deploy`; the agent's source is the installed `agent` package itself. Nothing here looks for
a checkout, so `pip install edgeforge` flashes boards as well as a clone does.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from importlib import metadata, resources
from pathlib import Path

import agent

UNIT = "edge-agent.service"
BOARD_CONFIG = "config.yaml"
INSTALLER = "install-agent.sh"
PLAYBOOK = "ansible/flash.yml"
BOARD_PYPROJECT = "board/pyproject.toml"
INVENTORY = "ansible/inventory.example.ini"
PACKAGED = (PLAYBOOK, INVENTORY, BOARD_CONFIG, UNIT, INSTALLER, BOARD_PYPROJECT)


def path(name: str) -> Path:
    """The file `name` of the deploy package's data, as a path on this machine."""
    found = resources.files("deploy").joinpath(name)
    return Path(str(found))


def read(name: str) -> bytes:
    """The bytes of the deploy package's data file `name`."""
    return resources.files("deploy").joinpath(name).read_bytes()


def version() -> str:
    """edgeforge's installed version (the board package gets the same)."""
    try:
        return metadata.version("edgeforge")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0.0.0+checkout"


def agent_source() -> tuple[bytes, str]:
    """The board's source as a tar.gz (agent/ and its own pyproject.toml, nothing of the
    optimizer or the operator tools) and a digest of its content (the install stamp)."""
    package = Path(agent.__file__).resolve().parent
    files = {f"agent/{p.relative_to(package).as_posix()}": p.read_bytes()
             for p in sorted(package.rglob("*.py"))}
    files["pyproject.toml"] = read(BOARD_PYPROJECT).replace(b"{version}", version().encode())
    digest = hashlib.sha256()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for rel, data in files.items():
            digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
            info = tarfile.TarInfo(rel)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), digest.hexdigest()
