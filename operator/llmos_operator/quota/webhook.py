"""The admission webhook's HTTPS endpoint: kopf's WebhookServer, a self-signed cert, review checks.

TLS, two documented ways: (a) default — the operator generates a self-signed certificate at
start-up (EC P-256, one year, SANs = the Service's DNS names + the listen address) with
`cryptography`, and kopf's managed mode (`LLMOS_WEBHOOK_MANAGED=<config name>`) writes it as the
`caBundle` of the ValidatingWebhookConfiguration, so nothing else is needed; (b) cert-manager —
mount its Secret and set `LLMOS_WEBHOOK_CERT_DIR` (tls.crt, tls.key, ca.crt), and let
cert-manager's CA injector fill the caBundle (annotation in manifests/webhook). When
`LLMOS_WEBHOOK_SERVICE=<namespace>/<name>` is set, the client config handed to kopf is a
Service reference (what apiservers can reach) rather than a URL.

kopf answers a body that is not an AdmissionReview with a 500 (KeyError deep inside); the
server here checks the review's shape first and answers 400 with a JSON reason instead.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import tempfile
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp.web
import kopf
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REVIEW_API_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")
OPERATIONS = ("CREATE", "UPDATE", "DELETE", "CONNECT")


@dataclass(frozen=True)
class WebhookConfig:
    """Where and how the webhook listens; env `LLMOS_WEBHOOK_<FIELD>` in the deployed operator.

    The defaults (loopback, random port, unmanaged) make an inert endpoint, so an operator
    started without configuration (tests of other handlers) serves admission harmlessly.
    """

    addr: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    host: str | None = None  # the name clients use (cert CN/SAN and URL); default: addr
    service: str | None = None  # "<namespace>/<name>": hand apiservers a Service reference
    cert_dir: str | None = None  # tls.crt + tls.key (+ ca.crt) from cert-manager
    managed: str | None = None  # ValidatingWebhookConfiguration kopf keeps in sync

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WebhookConfig:
        source = os.environ if env is None else env

        def get(name: str) -> str | None:
            return source.get("LLMOS_WEBHOOK_" + name) or None

        return cls(
            addr=get("ADDR") or cls.addr,
            port=int(get("PORT") or 0),
            host=get("HOST"),
            service=get("SERVICE"),
            cert_dir=get("CERT_DIR"),
            managed=get("MANAGED"),
        )

    def hostnames(self) -> list[str]:
        names = [self.host or self.addr]
        if self.service:
            namespace, _, name = self.service.partition("/")
            names += [f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"]
        return [*dict.fromkeys([*names, self.addr])]


def self_signed_certificate(hostnames: Collection[str], *, days: int = 365) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) valid for `hostnames` (DNS names or IP addresses)."""
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, next(iter(hostnames)))])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # why: clock skew between nodes
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        # why: the certificate is its own CA in the caBundle
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def review_problem(data: Any) -> str | None:
    """What is wrong with an AdmissionReview request body (None when it is well-formed)."""
    if not isinstance(data, dict):
        return "the body must be a JSON object (an AdmissionReview)"
    if data.get("kind") != "AdmissionReview":
        return "kind must be AdmissionReview"
    if data.get("apiVersion") not in REVIEW_API_VERSIONS:
        return f"apiVersion must be one of {', '.join(REVIEW_API_VERSIONS)}"
    request = data.get("request")
    if not isinstance(request, dict):
        return "request must be an object"
    if not isinstance(request.get("uid"), str) or not request["uid"]:
        return "request.uid must be a non-empty string"
    resource = request.get("resource")
    if not isinstance(resource, dict) or not all(
        isinstance(resource.get(k), str) for k in ("group", "version", "resource")
    ):
        return "request.resource must have string group, version and resource"
    if request.get("operation") not in OPERATIONS:
        return f"request.operation must be one of {', '.join(OPERATIONS)}"
    if not isinstance(request.get("userInfo"), dict):
        return "request.userInfo must be an object"
    if not any(isinstance(request.get(k), dict) for k in ("object", "oldObject")):
        return "request.object or request.oldObject must be an object"
    return None


class AdmissionServer(kopf.WebhookServer):
    """kopf's HTTPS webhook server with our certificate handling and review validation."""

    def __init__(self, config: WebhookConfig) -> None:
        self.config = config
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if config.cert_dir:
            certs = Path(config.cert_dir)
            ca = certs / "ca.crt"
            super().__init__(
                addr=config.addr,
                port=config.port or None,
                host=config.host,
                certfile=certs / "tls.crt",
                pkeyfile=certs / "tls.key",
                cafile=ca if ca.exists() else None,
            )
        else:
            cert, key = self_signed_certificate(config.hostnames())
            self._tmp = tempfile.TemporaryDirectory(prefix="llmos-webhook-")
            certfile, pkeyfile = Path(self._tmp.name, "tls.crt"), Path(self._tmp.name, "tls.key")
            certfile.write_bytes(cert)
            pkeyfile.touch(mode=0o600)
            pkeyfile.write_bytes(key)
            super().__init__(
                addr=config.addr,
                port=config.port or None,
                host=config.host,
                certfile=certfile,
                pkeyfile=pkeyfile,
            )

    async def __call__(self, fn: kopf.WebhookFn) -> AsyncIterator[kopf.WebhookClientConfig]:
        async def checked(data: Any, **kwargs: Any) -> Any:
            problem = review_problem(data)
            if problem is not None:
                raise aiohttp.web.HTTPBadRequest(
                    text=json.dumps({"error": f"malformed AdmissionReview: {problem}"}),
                    content_type="application/json",
                )
            return await fn(data, **kwargs)

        try:
            async for client_config in super().__call__(checked):  # type: ignore[arg-type]
                yield self._client_config(client_config)
        finally:
            if self._tmp is not None:
                self._tmp.cleanup()

    def _client_config(self, config: kopf.WebhookClientConfig) -> kopf.WebhookClientConfig:
        if not self.config.service:
            return config
        namespace, _, name = self.config.service.partition("/")
        port = int(str(config.get("url", "")).rsplit(":", 1)[-1].split("/", 1)[0] or 443)
        out = kopf.WebhookClientConfig(
            service={"namespace": namespace, "name": name, "port": port, "path": ""}
        )
        if "caBundle" in config:
            out["caBundle"] = config["caBundle"]
        return out
