"""``enclaveml broker ...``: the key broker (KMS + attestation + key release) and its store.

Files live under ``$ENCLAVEML_HOME/broker/``: ``broker.db`` (default SQLite store),
``admin.json`` (the admin credentials, 0600, written by ``init``) and ``tls/`` (the
certificate ``serve --self-signed`` creates). The root key comes from ``--root-key-file``
or the passphrase in ``ENCLAVEML_BROKER_PASSPHRASE`` (docs/broker.md).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, cast

import click

from enclaveml.attestation.tee import SimulatedTee, Tee, TeeKind, detect_tee
from enclaveml.broker.root_key import create_root_key_file, read_root_key_file
from enclaveml.broker.secret_prov import DEFAULT_PORT
from enclaveml.cli._app import App, err_console, out_console, pass_app
from enclaveml.cli.attest_cmds import collateral_source, trusted_sim_public_key, warn
from enclaveml.errors import ConfigError, IntegrityError
from enclaveml.kms import SCRYPT_DEFAULT, ScryptParams
from enclaveml.runtime.run import broker_sim_measurement, load_or_create_sim_key

if TYPE_CHECKING:
    from enclaveml.broker.store import BrokerStore

# The store, server and audit modules (SQLAlchemy, Alembic, uvicorn) are imported by the
# commands that use them, not when `enclaveml` starts.

__all__ = ["broker"]

PASSPHRASE_ENV = "ENCLAVEML_BROKER_PASSPHRASE"  # noqa: S105 - a variable name
CREDENTIALS_FILE = "admin.json"


def _default_db(app: App) -> str:
    return f"sqlite:///{app.broker_home / 'broker.db'}"


def _open_store(
    app: App, db: str | None, root_key_file: str | None, *, create: bool = False, log_n: int = 17
) -> BrokerStore:
    from enclaveml.broker.store import BrokerStore

    url, root_key = _store_root_key(app, db, root_key_file, create=create, log_n=log_n)
    return BrokerStore(url, root_key)


def _store_root_key(
    app: App, db: str | None, root_key_file: str | None, *, create: bool = False, log_n: int = 17
) -> tuple[str, bytes]:
    """The store URL and its root key (from the key file, or scrypt of the passphrase)."""
    from enclaveml.broker.store import BrokerStore

    url = db or _default_db(app)
    if url == _default_db(app):
        app.broker_home.mkdir(mode=0o700, parents=True, exist_ok=True)
    if root_key_file is not None:
        path = Path(root_key_file)
        if create and not path.exists():
            create_root_key_file(path)
            err_console.print(f"created root key file {path} (mode 0600): back it up apart from the database")
        return url, read_root_key_file(path)
    passphrase = os.environ.get(PASSPHRASE_ENV)
    if not passphrase:
        raise ConfigError(
            "no root key for the broker store",
            f"give --root-key-file FILE or set {PASSPHRASE_ENV}",
        )
    kdf = ScryptParams(log_n, SCRYPT_DEFAULT.r, SCRYPT_DEFAULT.p)
    return url, BrokerStore.passphrase_root_key(url, passphrase, kdf=kdf)


_db_option = click.option(
    "--db", metavar="URL", help="sqlite:///PATH or postgresql://... [default: HOME/broker/broker.db]."
)
_root_option = click.option(
    "--root-key-file",
    metavar="FILE",
    help=f"Root key file (32 bytes or 64 hex) [default: passphrase in ${PASSPHRASE_ENV}].",
)
_broker_option = click.option(
    "--broker", "url", metavar="URL", help="Broker URL [default: $ENCLAVEML_BROKER_URL or https://127.0.0.1:8443]."
)


@click.group()
def broker() -> None:
    """The key broker: KMS, attestation service and key release over an HTTPS API.

    \b
    Example:
      enclaveml broker init --root-key-file root.key
      enclaveml broker serve --root-key-file root.key --self-signed
      enclaveml broker enroll --name analytics --role owner
      enclaveml broker audit verify --root-key-file root.key
    """


@broker.command("init")
@_db_option
@_root_option
@click.option("--scrypt-log-n", type=click.IntRange(12, 22), default=SCRYPT_DEFAULT.log_n, show_default=True,
              help="scrypt cost for a passphrase root key (lower only for tests).")  # fmt: skip
@pass_app
def init(app: App, db: str | None, root_key_file: str | None, scrypt_log_n: int) -> None:
    """Create the broker's store and an admin app; prints its api key once.

    The root key file is created (0600) when it does not exist yet. The admin credentials
    are also written to HOME/broker/admin.json (mode 0600) for `broker enroll`.

    \b
    Example:
      enclaveml broker init --root-key-file /etc/enclaveml/root.key
      ENCLAVEML_BROKER_PASSPHRASE='...' enclaveml broker init --db postgresql://broker@db/broker
    """
    with _open_store(app, db, root_key_file, create=True, log_n=scrypt_log_n) as store:
        if any(a.role == "admin" for a in store.list_apps()):
            raise ConfigError(f"broker store {store.url} already has an admin app", "use its credentials")
        enrolled = store.enroll_app("admin", "admin", actor="broker-init")
    api_key = base64.b64encode(enrolled.api_key).decode()
    app.broker_home.mkdir(mode=0o700, parents=True, exist_ok=True)
    credentials = app.broker_home / CREDENTIALS_FILE
    fd = os.open(credentials, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"app_id": enrolled.app.app_id, "api_key": api_key, "role": "admin"}, out)
    out_console.print(f"admin app id:  {enrolled.app.app_id}", markup=False)
    out_console.print(f"admin api key: {api_key}", markup=False)
    err_console.print(f"the api key is shown once; also saved to {credentials} (mode 0600)", markup=False)


@broker.command("serve")
@_db_option
@_root_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8443, show_default=True, type=click.IntRange(0, 65535), help="HTTPS port.")
@click.option("--tls-cert", metavar="PEM", help="TLS certificate (chain) of the broker.")
@click.option("--tls-key", metavar="PEM", help="Private key of --tls-cert.")
@click.option("--self-signed", is_flag=True, help="Use (and create) a self-signed certificate in HOME/broker/tls.")
@click.option(
    "--secret-prov-port",
    type=click.IntRange(0, 65535),
    help=f"Also serve Gramine secret provisioning (e.g. {DEFAULT_PORT}).",
)
@click.option("--secret-prov-key", metavar="NAME", help="The key secret provisioning hands out.")
@click.option("--client-ca", metavar="PEM", help="Require mutual TLS: client certificates issued by this CA.")
@click.option("--trusted-sim-key", multiple=True, metavar="PEM",
              help="Accept simulated evidence only from these keys (repeatable) [default: any signer].")  # fmt: skip
@click.option("--collateral", metavar="FILE|DIR", help="DCAP collateral (offline) for verifying quotes.")
@click.option("--pccs", metavar="URL", help="Fetch DCAP collateral per platform from this PCCS or Intel PCS.")
@click.option("--pccs-ca", metavar="FILE", help="CA bundle for the PCCS's TLS certificate.")
@click.option("--collateral-cache", metavar="DIR", help="Keep fetched collateral here until it expires.")
@click.option("--attest-self", type=click.Choice(["auto", "sgx", "tdx", "snp", "sim"]),
              help="Prove the broker to workloads: evidence from its own TEE (bi-attestation).")  # fmt: skip
@click.option("--self-sim-key", metavar="PEM",
              help="With --attest-self sim: its key [default: HOME/broker/sim-key.pem, created 0600].")  # fmt: skip
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Broker processes sharing the port (use PostgreSQL for more than one).")  # fmt: skip
@pass_app
def serve(
    app: App,
    db: str | None,
    root_key_file: str | None,
    host: str,
    port: int,
    tls_cert: str | None,
    tls_key: str | None,
    self_signed: bool,
    secret_prov_port: int | None,
    secret_prov_key: str | None,
    client_ca: str | None,
    trusted_sim_key: tuple[str, ...],
    collateral: str | None,
    pccs: str | None,
    pccs_ca: str | None,
    collateral_cache: str | None,
    attest_self: str | None,
    self_sim_key: str | None,
    workers: int,
) -> None:
    """Serve the broker's API over TLS until SIGINT / SIGTERM.

    DCAP quotes are verified with --collateral (offline) or --pccs; simulated evidence is
    accepted only by policies with allow_simulation = true, and only from --trusted-sim-key
    signers when given. --attest-self makes the broker prove itself to workloads that run
    with `enclaveml run --verify-broker POLICY`. --workers N runs N broker processes on the
    port, each with its own connections to the store; one process uses at most one core.

    \b
    Example:
      enclaveml broker serve --root-key-file root.key --tls-cert cert.pem --tls-key key.pem --pccs https://pccs:8081
      enclaveml broker serve --root-key-file root.key --self-signed --secret-prov-port 4433 --secret-prov-key model
      enclaveml broker serve --root-key-file root.key --self-signed --client-ca clients-ca.pem --attest-self sim
      enclaveml broker serve --root-key-file root.key --self-signed --db postgresql://broker@db/broker --workers 4
    """
    from cryptography.hazmat.primitives.asymmetric import ec

    from enclaveml.broker.server import BrokerServer, make_self_signed, serve_workers
    from enclaveml.broker.store import BrokerStore

    if collateral and pccs:
        raise click.UsageError("give --collateral or --pccs, not both")
    if self_sim_key and attest_self != "sim":
        raise click.UsageError("--self-sim-key goes with --attest-self sim")
    if self_signed:
        if tls_cert or tls_key:
            raise ConfigError("--self-signed and --tls-cert/--tls-key exclude each other")
        tls = app.broker_home / "tls"
        cert, key = tls / "cert.pem", tls / "key.pem"
        if not cert.exists() or not key.exists():
            cert, key = make_self_signed(tls)
        tls_cert, tls_key = str(cert), str(key)
    if tls_cert is None:
        raise ConfigError("the broker serves TLS only", "give --tls-cert and --tls-key, or --self-signed")
    sim_keys = [trusted_sim_public_key(k) for k in trusted_sim_key]
    source = collateral_source(collateral, pccs, pccs_ca, collateral_cache)
    self_tee = _self_tee(app, attest_self, self_sim_key) if attest_self else None
    url, root_key = _store_root_key(app, db, root_key_file)
    # One attestation-result signing key for every worker: one JWKS whichever answers.
    result_key = ec.generate_private_key(ec.SECP256R1())

    def make_server(index: int) -> BrokerServer:
        """The server of worker ``index`` (or the only one): its own store; secret provisioning in worker 0."""
        store = BrokerStore(url, root_key)
        try:
            return BrokerServer(
                store,
                host,
                port,
                tls_cert,
                tls_key,
                secret_prov_port if index == 0 else None,
                secret_prov_key=secret_prov_key,
                sim_trusted_keys=sim_keys,
                result_signing_key=result_key,
                collateral=source,
                client_ca=client_ca,
                self_tee=self_tee,
                log_level="info",
            )
        except BaseException:
            store.close()
            raise

    mtls = f"; clients need certificates from {client_ca}" if client_ca else ""
    if workers == 1:
        server = make_server(0)
        where = f"https://{host}:{port} (store {server.store.url})"
        err_console.print(f"key broker on {where}; CA {tls_cert}{mtls}", markup=False)
        try:
            server.serve_forever()
        finally:
            server.store.close()
        return
    with BrokerStore(url, root_key) as store:  # migrates and checks the root key once, before forking
        shown = store.url
    pool = serve_workers(workers, make_server, host=host, port=port)
    err_console.print(f"key broker on {pool.url}, {workers} workers (store {shown}); CA {tls_cert}{mtls}", markup=False)
    pool.start().supervise()


def _self_tee(app: App, kind: str, sim_key: str | None) -> Tee:
    """The broker's own TEE; ``sim`` measures the installed enclaveml package (development only)."""
    if kind != "sim":
        return detect_tee(want=cast(TeeKind, kind))
    warn("--attest-self sim: the broker's evidence is simulated and proves nothing about this host")
    key, created = load_or_create_sim_key(Path(sim_key) if sim_key else app.broker_home / "sim-key.pem")
    measurement = broker_sim_measurement()
    err_console.print(
        f"self-attestation: simulated, measurement {measurement.hex()}" + (" (new simulation key)" if created else ""),
        markup=False,
    )
    return SimulatedTee(key, measurement, b"")


@broker.command("enroll")
@click.option("--name", required=True, help="App name (unique).")
@click.option("--role", required=True, type=click.Choice(["owner", "workload", "admin"]), help="The app's role.")
@_broker_option
@pass_app
def enroll(app: App, name: str, role: str, url: str | None) -> None:
    """Enroll an app through the API as the admin; prints its app id and api key once.

    Admin credentials: ENCLAVEML_APP_ID / ENCLAVEML_API_KEY, else HOME/broker/admin.json.

    \b
    Example:
      enclaveml broker enroll --name analytics --role owner
      enclaveml broker enroll --name training-job --role workload --broker https://broker:8443
    """
    if os.environ.get("ENCLAVEML_APP_ID") and os.environ.get("ENCLAVEML_API_KEY"):
        client = app.broker_client(url)
    else:
        path = app.broker_home / CREDENTIALS_FILE
        if not path.exists():
            raise ConfigError(
                "no admin credentials", f"set ENCLAVEML_APP_ID / ENCLAVEML_API_KEY, or run on the host with {path}"
            )
        saved = json.loads(path.read_text())
        client = app.broker_client(url, credentials=(saved["app_id"], saved["api_key"]))
    with client:
        answer = client.enroll(name, role)
    out_console.print(f"app id:  {answer['app_id']}", markup=False)
    out_console.print(f"api key: {answer['api_key']}", markup=False)
    err_console.print(f"enrolled {name} ({role}); the api key is shown once", markup=False)


@broker.group("audit")
def audit() -> None:
    """The broker's hash-chained audit log.

    \b
    Example:
      enclaveml broker audit verify --root-key-file root.key
    """


@audit.command("verify")
@_db_option
@_root_option
@pass_app
def audit_verify(app: App, db: str | None, root_key_file: str | None) -> None:
    """Check every audit entry: links, hashes and seals. Exit 4 naming the first bad entry.

    \b
    Example:
      enclaveml broker audit verify --db sqlite:///var/lib/enclaveml/broker.db --root-key-file root.key
    """
    from enclaveml.broker.audit import verify_audit_chain

    with _open_store(app, db, root_key_file) as store:
        report = verify_audit_chain(store)
    if not report.ok:
        raise IntegrityError(
            f"audit log entry {report.first_bad_seq} is bad: {report.problem}",
            f"entries 1..{report.head_seq} are intact; restore the log from a backup and investigate",
        )
    out_console.print(
        f"audit log ok: {report.entries} entries, head seq {report.head_seq} hash {report.head_hash}", markup=False
    )
