"""nginx as a gRPC load balancer over model-server replicas: render ``deploy/nginx/grpc-lb.conf.template``.

The template holds the nginx configuration (why each directive is there is written in it);
this module fills its ``${NAME}`` placeholders from a ``GrpcLoadBalancer`` and refuses
anything that would produce a broken or silently insecure file: no backends, a certificate
without its key, a backend CA without ``backend_tls``, a value with a ``;``, ``{`` or a
newline (nginx directive injection). nginx variables (``$upstream_addr``) are left alone:
only upper-case ``${...}`` names are placeholders, and every one must be filled.

Used by the scale-out test (two real replicas behind a real nginx) and for standalone
deployments; on Kubernetes ingress-nginx plays this role (``deploy/helm``).

    config = GrpcLoadBalancer(listen="0.0.0.0:8500", backends=("10.0.0.5:8500", "10.0.0.6:8500"))
    write_grpc_lb_config(config, Path("/etc/nginx/nginx.conf"))
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from enclaveml._atomic import atomic_output
from enclaveml.errors import ConfigError

__all__ = ["TEMPLATE", "GrpcLoadBalancer", "render_grpc_lb_config", "write_grpc_lb_config"]

TEMPLATE = Path(__file__).resolve().parents[3] / "deploy" / "nginx" / "grpc-lb.conf.template"
_PLACEHOLDER = re.compile(r"\$\{([A-Z_]+)\}")
_UNSAFE = re.compile(r"[;{}\s'\"\\]")  # would end or open a directive, or split an argument
_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):\d{1,5}|unix:/[^\s;{}]+")


@dataclass(frozen=True)
class GrpcLoadBalancer:
    """One nginx listening for gRPC and balancing over ``backends``. Defaults in brackets.

    ``listen``               ``[ADDR:]PORT`` clients connect to [``0.0.0.0:8500``]
    ``backends``             replicas' gRPC ``host:port``; each gets ``max_fails`` [1] /
                             ``fail_timeout`` [``10s``]
    ``runtime_dir``          pid file and temp directories [``/var/lib/enclaveml-nginx``]
    ``error_log``            [``stderr``]; ``access_log`` [``off``] (a path: one line per request)
    ``master_process``       [True]; False = one process that needs no user switch (tests)
    ``worker_processes``     [``auto``]
    ``tls_cert/tls_key``     TLS to clients (PEM files) [none: plaintext HTTP/2]
    ``client_ca``            require client certificates from this CA (mutual TLS)
    ``backend_tls``          ``grpcs://`` to the replicas [False]
    ``backend_ca``           verify the replicas' certificates against this CA [none: not verified]
    ``backend_server_name``  the name their certificates carry (SNI and check) [``localhost``]
    ``backend_client_cert/key``  present a client certificate to replicas serving mutual TLS
    ``keepalive``            idle kept-alive connections per worker to the replicas [32]
    ``next_upstream_tries``  attempts per request, the first included [3]
    ``connect_timeout``      [``2s``]; ``read_timeout`` [``60s``]; ``max_body`` [``64m``]
    """

    backends: tuple[str, ...]
    listen: str = "0.0.0.0:8500"
    runtime_dir: Path = Path("/var/lib/enclaveml-nginx")
    error_log: str = "stderr"
    access_log: str = "off"
    master_process: bool = True
    worker_processes: str = "auto"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    backend_tls: bool = False
    backend_ca: Path | None = None
    backend_server_name: str = "localhost"
    backend_client_cert: Path | None = None
    backend_client_key: Path | None = None
    keepalive: int = 32
    next_upstream_tries: int = 3
    max_fails: int = 1
    fail_timeout: str = "10s"
    connect_timeout: str = "2s"
    read_timeout: str = "60s"
    max_body: str = "64m"
    extra_server_directives: Sequence[str] = field(default=())

    def __post_init__(self) -> None:
        if not self.backends:
            raise ConfigError("no backends to balance over", "give each replica's host:port")
        for backend in self.backends:
            if not _ADDRESS.fullmatch(backend):
                raise ConfigError(f"backend {backend!r} is not HOST:PORT", "e.g. 10.0.0.5:8500")
        if not re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]:|[0-9A-Za-z.-]+:)?\d{1,5}", self.listen):
            raise ConfigError(f"listen {self.listen!r} is not [ADDR:]PORT", "e.g. 0.0.0.0:8500 or 8500")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS to clients needs both tls_cert and tls_key")
        if self.client_ca is not None and self.tls_cert is None:
            raise ConfigError("client_ca (mutual TLS) needs TLS to clients", "give tls_cert and tls_key too")
        backend_pki = (self.backend_ca, self.backend_client_cert, self.backend_client_key)
        if not self.backend_tls and any(p is not None for p in backend_pki):
            raise ConfigError("backend certificates are set but backend_tls is off", "set backend_tls=True")
        if (self.backend_client_cert is None) != (self.backend_client_key is None):
            raise ConfigError("a backend client certificate needs its key, and the key its certificate")
        for name in ("keepalive", "next_upstream_tries", "max_fails"):
            if getattr(self, name) < (0 if name == "keepalive" else 1):
                raise ConfigError(f"{name} is {getattr(self, name)}, out of range")
        for value in (
            self.error_log,
            self.access_log,
            self.worker_processes,
            self.backend_server_name,
            self.fail_timeout,
            self.connect_timeout,
            self.read_timeout,
            self.max_body,
            *(str(p) for p in (self.runtime_dir, self.tls_cert, self.tls_key, self.client_ca, *backend_pki) if p),
        ):
            if not value or _UNSAFE.search(value):
                raise ConfigError(f"{value!r} cannot go into an nginx directive", "no spaces, quotes, ; { }")


def _lines(indent: int, directives: Sequence[str]) -> str:
    return "\n".join(" " * indent + d for d in directives)


def render_grpc_lb_config(config: GrpcLoadBalancer, *, template: Path = TEMPLATE) -> str:
    """The nginx configuration for ``config``: the template with every placeholder filled."""
    servers = [f"server {b} max_fails={config.max_fails} fail_timeout={config.fail_timeout};" for b in config.backends]
    client_tls: list[str] = []
    if config.tls_cert is not None:
        client_tls = [
            f"ssl_certificate {config.tls_cert};",
            f"ssl_certificate_key {config.tls_key};",
            "ssl_protocols TLSv1.2 TLSv1.3;",
            "ssl_session_cache shared:enclaveml_tls:10m;",
        ]
        if config.client_ca is not None:
            client_tls += [f"ssl_client_certificate {config.client_ca};", "ssl_verify_client on;"]
    client_tls += list(config.extra_server_directives)
    upstream_tls: list[str] = []
    if config.backend_tls:
        upstream_tls = [
            "grpc_ssl_protocols TLSv1.2 TLSv1.3;",
            "grpc_ssl_session_reuse on;",
            "grpc_ssl_server_name on;",
            f"grpc_ssl_name {config.backend_server_name};",
        ]
        if config.backend_ca is not None:
            upstream_tls += [
                f"grpc_ssl_trusted_certificate {config.backend_ca};",
                "grpc_ssl_verify on;",
                "grpc_ssl_verify_depth 2;",
            ]
        if config.backend_client_cert is not None:
            upstream_tls += [
                f"grpc_ssl_certificate {config.backend_client_cert};",
                f"grpc_ssl_certificate_key {config.backend_client_key};",
            ]
    values = {
        "MASTER_PROCESS": "on" if config.master_process else "off",
        "WORKER_PROCESSES": config.worker_processes,
        "RUNTIME_DIR": str(config.runtime_dir),
        "ERROR_LOG": config.error_log,
        "ACCESS_LOG": config.access_log,
        "UPSTREAM_SERVERS": _lines(8, servers),
        "UPSTREAM_KEEPALIVE": str(config.keepalive),
        "LISTEN": config.listen,
        "LISTEN_SSL": " ssl" if config.tls_cert is not None else "",
        "CLIENT_TLS": _lines(8, client_tls),
        "MAX_BODY": config.max_body,
        "UPSTREAM_SCHEME": "grpcs" if config.backend_tls else "grpc",
        "UPSTREAM_TLS": _lines(12, upstream_tls),
        "CONNECT_TIMEOUT": config.connect_timeout,
        "READ_TIMEOUT": config.read_timeout,
        "NEXT_UPSTREAM_TRIES": str(config.next_upstream_tries),
    }
    text = template.read_text()
    missing = set(_PLACEHOLDER.findall(text)) - values.keys()
    if missing:
        raise ConfigError(f"{template.name} has placeholders this renderer does not know: {sorted(missing)}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def write_grpc_lb_config(config: GrpcLoadBalancer, path: Path, *, template: Path = TEMPLATE) -> Path:
    """Render and write atomically (0644: nginx reads it; it holds paths, never key material)."""
    text = render_grpc_lb_config(config, template=template)
    with atomic_output(path, mode=0o644) as out:
        out.write(text.encode())
    return path
