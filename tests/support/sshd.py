"""A real OpenSSH server (Debian's openssh-server) on a free loopback port, for edge-deploy.

Throwaway host and user keys in the test's folder; it accepts only that user key, for the
user running the tests. The client options pin the host key to a known_hosts file of our
own, so nothing touches ~/.ssh.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
from pathlib import Path

from tests.support.broker import free_port, wait_listening


def sshd_binary() -> str:
    path = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists()
                                    else None)
    if path is None:
        raise RuntimeError("sshd is not installed: apt-get install openssh-server "
                           "(bash .ci/run does this)")
    return path


class Sshd:
    """sshd -D on 127.0.0.1:<port>; `target`, `identity` and `options` for edge-deploy."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.user = getpass.getuser()
        self.identity = workdir / "user_key"
        host_key = workdir / "host_key"
        for key in (host_key, self.identity):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                           check=True)
        (workdir / "authorized_keys").write_text(Path(f"{self.identity}.pub").read_text())
        os.chmod(workdir / "authorized_keys", 0o600)
        pub = Path(f"{host_key}.pub").read_text().split()
        (workdir / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {pub[0]} {pub[1]}\n")
        self.config = workdir / "sshd_config"
        self.config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
            f"AuthorizedKeysFile {workdir}/authorized_keys\nPidFile {workdir}/sshd.pid\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            "PermitRootLogin prohibit-password\nStrictModes no\nLogLevel VERBOSE\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"{self.user}@127.0.0.1:{self.port}"

    @property
    def options(self) -> list[str]:
        return [f"UserKnownHostsFile={self.workdir}/known_hosts", "StrictHostKeyChecking=yes"]

    def start(self) -> None:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        log = (self.workdir / "sshd.log").open("ab")
        self.proc = subprocess.Popen([sshd_binary(), "-D", "-e", "-f", str(self.config)],
                                     stdout=log, stderr=log)
        log.close()
        wait_listening(self.proc, self.port, "sshd", self.workdir / "sshd.log")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
