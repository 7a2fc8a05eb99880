"""Who may use the cloud, against real uvicorn servers (tiny backbone) and httpx devices: closed
registration, revoked and rotated tokens (401), per-device rate limits (429 with Retry-After),
a generation over TLS with a self-signed certificate the device verifies, and the defaults that
keep a fresh install private (closed registration and a rate limit off loopback; the demo on
127.0.0.1)."""

from __future__ import annotations

import datetime
import ipaddress

import httpx
import pytest
from cloud_server import running
from typer.testing import CliRunner

from app.cli import cli
from app.demo import DemoSettings
from cloud_api.settings import CloudSettings
from device_agent.client import ClientConfig, CloudClient
from device_agent.errors import CloudError, CloudUnreachable
from device_agent.generation import RemoteGeneration
from personalization.config import DecodeConfig

OPERATOR = "operator-secret-token"


def _register(url: str, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{url}/v1/devices", json={"name": "d"}, headers=headers)


def _info(url: str, token: str) -> httpx.Response:
    return httpx.get(f"{url}/v1/info", headers={"Authorization": f"Bearer {token}"})


def test_fresh_installs_are_private_off_loopback():
    local, public = CloudSettings(host="127.0.0.1"), CloudSettings(host="0.0.0.0")
    assert (local.registration_policy, local.rate_limits) == ("open", None)
    assert (public.registration_policy, public.rate_limits) == ("closed", "100/second")
    assert CloudSettings(host="0.0.0.0", registration="open").registration_policy == "open"
    assert CloudSettings(host="0.0.0.0", rate_limit="none").rate_limits is None
    assert DemoSettings().host == "127.0.0.1"  # the demo binds to loopback unless told


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--rate-limit", "lots"], "rate_limit 'lots' is not in the limits notation"),
        (["--registration", "maybe"], "registration: Input should be 'open' or 'closed'"),
        (["--ssl-certfile", "cert.pem"], "TLS needs both ssl_certfile and ssl_keyfile"),
    ],
)
def test_bad_access_flags_are_one_line_errors(flags, message):
    result = CliRunner().invoke(cli, ["cloud", *flags])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output


def test_closed_registration_needs_the_operator_token(tmp_path):
    with running(tmp_path, registration="closed", operator_token=OPERATOR) as server:
        refused = _register(server.url)
        assert refused.status_code == 403
        assert "registration on this cloud is closed" in refused.json()["detail"]
        assert _register(server.url, "a guess").status_code == 403
        with CloudClient(server.url) as client:
            with pytest.raises(CloudError, match="needs the operator's token"):
                client.register("intruder")
            device_id, token = client.register("phone", operator_token=OPERATOR)
        assert _info(server.url, token).status_code == 200
    with running(tmp_path / "no-operator", registration="closed") as server:
        detail = _register(server.url, "anything").json()["detail"]
        assert "this cloud has no operator token" in detail


def test_revoked_and_rotated_tokens_stop_working(tmp_path):
    with running(tmp_path, operator_token=OPERATOR) as server:
        url = server.url
        mine, other = _register(url).json(), _register(url).json()
        # a device revokes its own token
        with CloudClient(url, mine["token"]) as client:
            client.revoke()
        gone = _info(url, mine["token"])
        assert gone.status_code == 401 and "revoked" in gone.json()["detail"]
        # rotation: the old token stops, the client goes on with the new one
        with CloudClient(url, other["token"]) as client:
            new = client.rotate_token()
            assert client.info().num_layers > 0
        assert _info(url, other["token"]).status_code == 401
        assert _info(url, new).status_code == 200
        # only the operator revokes another device
        device, operator = (
            {"Authorization": f"Bearer {new}"},
            {"Authorization": f"Bearer {OPERATOR}"},
        )
        revoke = f"{url}/v1/devices/{{}}"
        assert httpx.delete(revoke.format(mine["device_id"]), headers=device).status_code == 403
        assert httpx.delete(revoke.format(other["device_id"]), headers=operator).status_code == 204
        assert _info(url, new).status_code == 401
        missing = httpx.delete(f"{url}/v1/devices/nosuchdevice", headers=operator)
        assert missing.status_code == 404 and "no device" in missing.json()["detail"]


def test_rate_limits_are_per_device_with_retry_after(tmp_path):
    with running(tmp_path, rate_limit="5/minute") as server:
        first, second = _register(server.url).json()["token"], _register(server.url).json()["token"]
        codes = [_info(server.url, first).status_code for _ in range(5)]
        refused = _info(server.url, first)
        assert codes == [200] * 5 and refused.status_code == 429
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert "rate limit of 5 per 1 minute" in refused.json()["detail"]
        assert _info(server.url, second).status_code == 200  # another device is not affected


def _self_signed(directory) -> tuple:
    """A certificate for 127.0.0.1 and its key (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "spa test cloud")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def test_a_generation_over_tls_with_a_certificate_the_device_verifies(tmp_path):
    cert, key = _self_signed(tmp_path)
    with running(tmp_path, ssl_certfile=cert, ssl_keyfile=key) as server:
        assert server.url.startswith("https://127.0.0.1:")
        with CloudClient(server.url) as untrusting, pytest.raises(CloudUnreachable, match="CERT"):
            untrusting.register("phone")
        trusting = ClientConfig(ca_file=str(cert))
        with CloudClient(server.url, config=trusting) as client:
            _, token = client.register("phone")
        with CloudClient(server.url, token, config=trusting) as client:
            generation = RemoteGeneration(
                client, None, "hello", "base", DecodeConfig(max_new_tokens=6)
            )
            tokens = list(generation)
            received = client.link.bytes_down  # what crossed the TLS connection to the device
        assert generation.status == "finished" and len(tokens) == 6
        assert "".join(t.text for t in tokens) and received > 0
