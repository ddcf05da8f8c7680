"""MQTT over TLS with a client certificate, username and password, against a real mosquitto."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Agent
from tests.support.broker import Broker

pytestmark = pytest.mark.e2e


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def issue(pki: Path, name: str, ca: str, san: str | None) -> None:
    """An EC key and a certificate for `name`, signed by `ca` (self-signed when ca == name)."""
    key, crt = pki / f"{name}.key", pki / f"{name}.crt"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    if ca == name:
        openssl("req", "-x509", *ec, "-keyout", key, "-out", crt, "-days", "2",
                "-subj", f"/CN={name}")
        return
    csr = pki / f"{name}.csr"
    openssl("req", *ec, "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
    ext = pki / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    openssl("x509", "-req", "-in", csr, "-CA", pki / f"{ca}.crt", "-CAkey", pki / f"{ca}.key",
            "-CAcreateserial", "-out", crt, "-days", "2", "-extfile", ext)


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[Broker, Path]]:
    pki = tmp_path / "pki"
    pki.mkdir()
    issue(pki, "ca", "ca", None)
    issue(pki, "server", "ca", "IP:127.0.0.1,DNS:localhost")
    issue(pki, "client", "ca", None)
    passwd = pki / "passwd"
    passwd.write_text("")
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "board", "s3cret"], check=True,
                   capture_output=True, timeout=30)
    broker = Broker(tmp_path / "broker", f"cafile {pki}/ca.crt\ncertfile {pki}/server.crt\n"
                    f"keyfile {pki}/server.key\nrequire_certificate true\n"
                    f"allow_anonymous false\npassword_file {passwd}\n")
    broker.start()
    yield broker, pki
    broker.stop()


def tls_settings(pki: Path, password: str) -> list[str]:
    return ["mqtt.tls=true", f"mqtt.ca_file={pki}/ca.crt", f"mqtt.cert_file={pki}/client.crt",
            f"mqtt.key_file={pki}/client.key", "mqtt.username=board",
            f"mqtt.password={password}"]


def subscribe(broker: Broker, pki: Path, count: int) -> subprocess.Popen[str]:
    """A plain mosquitto_sub over the same TLS listener, waiting for `count` messages."""
    return subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "--cafile",
         f"{pki}/ca.crt", "--cert", f"{pki}/client.crt", "--key", f"{pki}/client.key",
         "-u", "board", "-P", "s3cret", "-t", "edgeforge/testboard/telemetry", "-C",
         str(count), "-W", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_telemetry_flows_over_tls_with_client_certificate_and_password(
        bundle: Path, tls_broker: tuple[Broker, Path], tmp_path: Path) -> None:
    broker, pki = tls_broker
    sub = subscribe(broker, pki, 3)
    agent = Agent(bundle, broker.port, tmp_path, *tls_settings(pki, "s3cret"), duration=4)
    assert agent.wait() == 0, agent.output()
    out, err = sub.communicate(timeout=60)
    assert sub.returncode == 0, err
    assert len(out.strip().splitlines()) == 3 and '"schema":"edgeforge.telemetry/1"' in out
    assert "mqtt: connected to 127.0.0.1" in agent.output()


def test_wrong_password_is_reported_per_attempt_and_telemetry_stays_spooled(
        bundle: Path, tls_broker: tuple[Broker, Path], tmp_path: Path) -> None:
    broker, pki = tls_broker
    agent = Agent(bundle, broker.port, tmp_path, *tls_settings(pki, "wrong"), duration=4)
    assert agent.wait() == 0, agent.output()
    log = agent.output()
    refusals = log.count("refused the connection")
    assert 1 <= refusals <= 4, log
    assert "check mqtt.username, mqtt.password" in log
    assert "stay spooled for the next start" in log
