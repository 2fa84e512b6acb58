"""Handing primary keys (KEKs) to the Spark JVM, so parquet-mr's ``EnclaveKmsClient`` can wrap and unwrap.

parquet-mr calls its ``KmsClient`` inside the JVM, on the driver and on executors; it cannot
call back into Python. So the driver puts the key material it holds into the Hadoop
configuration of its own Spark session, in memory::

    enclaveml.kms.secret.keys = name|key_id|version|base64(kek);...
    enclaveml.kms.name        = local | broker | ...   (recorded in wrapped keys)

Trust argument: the Python driver already holds these keys (it unwraps EML data keys with
them), and the driver JVM and the executors run inside the same TEE / trust domain as the
driver process (``enclaveml submit`` puts them in attested pods). The property is set on a
per-context session's runtime SQL configuration, never in ``SparkConf`` (so never on a
command line), never written to disk by us; Spark ships it to executors inside the Hadoop
configuration it broadcasts, over the authenticated, encrypted RPC (``spark_engine``).
Its name contains ``secret``, which Spark's default ``spark.redaction.regex``
(``(?i)secret|password|token|access[.]?key``) redacts from the UI, event logs and
``SET`` output. Only keys the KMS object would itself unwrap with are exported: all enabled
versions of a ``LocalKms``, exactly the released versions of a ``Session``.

``KeyManagementService`` has no method that returns key material (on purpose). The two
in-process backends that hold it, ``LocalKms`` and ``Session``, each have one explicitly
named method for this one use, ``export_secret_keys_for_trusted_runtime()``. A remote KMS
(``BrokerKms``) never hands material out: use ``enclaveml.session()`` inside ``enclaveml
run`` instead.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field

from enclaveml.crypto import KeyWrapper
from enclaveml.errors import ConfigError

__all__ = ["KMS_NAME_PROPERTY", "SECRET_KEYS_PROPERTY", "Kek", "exported_keks", "secret_keys_value"]

SECRET_KEYS_PROPERTY = "enclaveml.kms.secret.keys"  # noqa: S105 - a property name
KMS_NAME_PROPERTY = "enclaveml.kms.name"
_FIELD_RE = re.compile(r"[^|;:\s]+")


@dataclass(frozen=True)
class Kek:
    """One primary key version; ``repr`` never shows the material."""

    name: str
    key_id: str
    version: int
    material: bytes = field(repr=False)


def exported_keks(kms: KeyWrapper) -> tuple[str, list[Kek]]:
    """(KMS name, key versions) of an in-process KMS: ``LocalKms`` or a ``Session``."""
    from enclaveml.kms import LocalKms
    from enclaveml.runtime.session import Session

    if isinstance(kms, (Session, LocalKms)):  # a LocalKms verifies its store's seal here, as on every call
        keys = [Kek(k.name, k.key_id, k.version, k.material) for k in kms.export_secret_keys_for_trusted_runtime()]
        return kms.kms_name, keys
    raise ConfigError(
        f"the Spark engine cannot use a {type(kms).__name__}: parquet-mr needs the keys inside the JVM",
        "use the local key store, or enclaveml.session() inside `enclaveml run`",
    )


def secret_keys_value(keks: list[Kek]) -> str:
    """The value of ``SECRET_KEYS_PROPERTY`` for ``keks`` (a secret: never log or persist it)."""
    if not keks:
        raise ConfigError("the key source holds no keys to hand to Spark", "create or release a key first")
    entries = []
    for kek in keks:
        if not (_FIELD_RE.fullmatch(kek.name) and _FIELD_RE.fullmatch(kek.key_id)):
            raise ConfigError(f"key name {kek.name!r} or id {kek.key_id!r} cannot be passed to Spark")
        entries.append(f"{kek.name}|{kek.key_id}|{kek.version}|{base64.b64encode(kek.material).decode('ascii')}")
    return ";".join(entries)
