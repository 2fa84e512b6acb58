"""The Spark engine of ``TrustedContext``: a hardened SparkSession, parquet-mr encryption, our KmsClient.

``secure_spark_session()`` creates (or checks) the process's SparkSession with

=========================================  ==================================================
setting                                    why
=========================================  ==================================================
``spark.authenticate=true`` + a random     only holders of the secret join the application
``spark.authenticate.secret``              (redacted: its name matches ``spark.redaction.regex``)
``spark.network.crypto.enabled=true``      RPC and block transfers between driver and executors
                                           are encrypted (AES, keys from the auth handshake)
``spark.io.encryption.enabled=true``       shuffle and spill files, and cached blocks on disk,
                                           are encrypted; it also makes pyspark hand data to
                                           the JVM over a local socket instead of a temp file
``spark.ui.enabled=false``                 no unauthenticated web UI showing plans and samples
``spark.local.dir``, ``java.io.tmpdir``    a private 0700 ``enclaveml-spark-*`` directory,
                                           removed by ``stop_spark_session``
``spark.driver/executor.extraClassPath``   our ``EnclaveKmsClient`` jar (``spark_jar``)
``spark.hadoop.parquet.crypto.*``          parquet-mr's ``PropertiesDrivenCryptoFactory`` with
                                           the standard flavour's settings (below)
=========================================  ==================================================

Standard flavour, as ``enclaveml.crypto.parquet.encryption_configuration`` sets it for pyarrow:
AES_GCM_V1, encrypted footer, uniform encryption (``parquet.encryption.uniform.key`` = our key
name, given per write), single wrapping, key material inside the file, 256-bit data keys.
parquet-mr adds a random file-unique AAD prefix like parquet-cpp does.

Each ``SparkEngine`` (one per ``TrustedContext``) works in its own ``newSession()`` of the
shared SparkContext: its own temp views and its own runtime configuration, which carries the
keys for the KmsClient (``spark_keys``) and a random KMS access token, so parquet-mr's
KmsClient cache never serves one context's keys to another.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from enclaveml.analytics.arrow_io import TextTableReader, write_text_batches
from enclaveml.analytics.context import Result
from enclaveml.analytics.spark_jar import KMS_CLIENT_CLASS, kms_client_jar
from enclaveml.analytics.spark_keys import KMS_NAME_PROPERTY, SECRET_KEYS_PROPERTY, exported_keks, secret_keys_value
from enclaveml.crypto import KeyWrapper
from enclaveml.errors import ConfigError, EnclaveMLError, FormatError, IntegrityError, KeyNotFound

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import DataFrame, SparkSession

__all__ = [
    "PARQUET_CRYPTO_SETTINGS",
    "SECURITY_SETTINGS",
    "SparkEngine",
    "SparkResult",
    "check_spark_security",
    "secure_spark_session",
    "stop_spark_session",
]

#: Spark settings a session must have (checked on sessions created elsewhere, too).
SECURITY_SETTINGS: dict[str, str] = {
    "spark.authenticate": "true",
    "spark.network.crypto.enabled": "true",
    "spark.io.encryption.enabled": "true",
    "spark.ui.enabled": "false",
}
#: parquet-mr's crypto factory with the standard flavour's settings (module docstring).
PARQUET_CRYPTO_SETTINGS: dict[str, str] = {
    "spark.hadoop.parquet.crypto.factory.class": "org.apache.parquet.crypto.keytools.PropertiesDrivenCryptoFactory",
    "spark.hadoop.parquet.encryption.kms.client.class": KMS_CLIENT_CLASS,
    "spark.hadoop.parquet.encryption.algorithm": "AES_GCM_V1",
    "spark.hadoop.parquet.encryption.plaintext.footer": "false",
    "spark.hadoop.parquet.encryption.double.wrapping": "false",
    "spark.hadoop.parquet.encryption.key.material.store.internally": "true",
    "spark.hadoop.parquet.encryption.data.key.length.bits": "256",
}
_LOCAL_DIR_PREFIX = "enclaveml-spark-"
_UNIFORM_KEY = "parquet.encryption.uniform.key"
_ACCESS_TOKEN = "parquet.encryption.key.access.token"  # noqa: S105 - a property name
_KMS_INSTANCE = "parquet.encryption.kms.instance.id"
_JAVA_REASON = re.compile(r"enclaveml-([a-z-]+): ([^\n\r]*)")
_CRYPTO_FAILURE = re.compile(r"AEADBadTagException|ParquetCryptoRuntimeException|GCM tag|Tag mismatch")
_NOT_DECRYPTABLE = "cannot be decrypted: it was modified or truncated, or is not meant for this key"


# --- the session ---------------------------------------------------------------------------


def secure_spark_session(
    *,
    master: str = "local[2]",
    local_dir_parent: str | os.PathLike[str] | None = None,
    conf: Mapping[str, str] | None = None,
    app_name: str = "enclaveml",
) -> SparkSession:
    """This process's SparkSession with the settings in the module docstring.

    If a SparkSession already runs (e.g. started by ``spark-submit``), it is returned only if
    it has ``SECURITY_SETTINGS`` and ``PARQUET_CRYPTO_SETTINGS`` (else ``ConfigError``);
    ``conf`` adds settings (e.g. ``spark.sql.shuffle.partitions``), never weaker security ones.
    """
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise ConfigError("pyspark is not installed", "install enclaveml with the spark extra") from None
    extra = dict(conf or {})
    weakened = [k for k in (*SECURITY_SETTINGS, *PARQUET_CRYPTO_SETTINGS) if k in extra]
    if weakened:
        raise ConfigError(f"conf= may not override {', '.join(weakened)}", "these settings are fixed by enclaveml")
    jar = str(kms_client_jar())
    local_dir = tempfile.mkdtemp(prefix=_LOCAL_DIR_PREFIX, dir=local_dir_parent)  # 0700
    settings = {
        **SECURITY_SETTINGS,
        **PARQUET_CRYPTO_SETTINGS,
        "spark.authenticate.secret": secrets.token_hex(32),
        "spark.local.dir": local_dir,
        "spark.driver.extraJavaOptions": f"-Djava.io.tmpdir={local_dir}",
        "spark.driver.extraClassPath": jar,
        "spark.executor.extraClassPath": jar,
        **extra,
    }
    if master.startswith("local"):
        settings.setdefault("spark.driver.bindAddress", "127.0.0.1")
        settings.setdefault("spark.driver.host", "127.0.0.1")
    builder = SparkSession.builder.master(master).appName(app_name)
    for key, value in settings.items():
        builder = builder.config(key, value)
    try:
        spark = builder.getOrCreate()
    except BaseException:
        shutil.rmtree(local_dir, ignore_errors=True)
        raise
    if spark.sparkContext.getConf().get("spark.local.dir") != local_dir:  # an existing session was returned
        shutil.rmtree(local_dir, ignore_errors=True)
    check_spark_security(spark)
    return spark


def check_spark_security(spark: SparkSession) -> None:
    """``ConfigError`` unless ``spark`` runs with ``SECURITY_SETTINGS`` and ``PARQUET_CRYPTO_SETTINGS``."""
    conf = spark.sparkContext.getConf()
    for key, wanted in {**SECURITY_SETTINGS, **PARQUET_CRYPTO_SETTINGS}.items():
        actual = conf.get(key)
        if actual != wanted:
            raise ConfigError(
                f"the running SparkSession has {key}={actual}, enclaveml needs {wanted}",
                "create the session with enclaveml.analytics.spark_engine.secure_spark_session() "
                "(or pass these settings to spark-submit)",
            )


def stop_spark_session(spark: SparkSession) -> None:
    """Stop ``spark`` and remove the private local directory ``secure_spark_session`` made for it."""
    local_dir = spark.sparkContext.getConf().get("spark.local.dir")
    spark.stop()
    if local_dir and Path(local_dir).name.startswith(_LOCAL_DIR_PREFIX):
        shutil.rmtree(local_dir, ignore_errors=True)


# --- errors from the JVM ---------------------------------------------------------------------


def _translated(exc: Exception, subject: object) -> EnclaveMLError | None:
    """Our error for a Spark failure caused by decryption or keys; ``None`` for anything else."""
    text = str(exc)
    if match := _JAVA_REASON.search(text):
        reason, what = match.groups()
        if reason in ("key-not-found", "no-keys"):
            return KeyNotFound(f"{subject}: {what}", "release that key (and version) to the job, or use its KMS")
        if reason == "format":
            return FormatError(f"{subject}: {what}")
        if reason == "integrity":
            return IntegrityError(f"{subject} {_NOT_DECRYPTABLE}")
        return ConfigError(f"{subject}: {what}")
    if KMS_CLIENT_CLASS in text and "ClassNotFoundException" in text:
        return ConfigError("Spark cannot load enclaveml's KmsClient", "start Spark with secure_spark_session()")
    if _CRYPTO_FAILURE.search(text):
        return IntegrityError(f"{subject} {_NOT_DECRYPTABLE}")
    return None


@contextlib.contextmanager
def _spark_errors(subject: object) -> Iterator[None]:
    """Decryption and key failures become one enclaveml error (Spark's text is withheld)."""
    try:
        yield
    except EnclaveMLError:
        raise
    except Exception as exc:
        translated = _translated(exc, subject)
        if translated is None:
            raise
        raise translated from None


# --- results ---------------------------------------------------------------------------------


class SparkResult(Result):
    """A query's answer as a Spark DataFrame; the same methods as the DuckDB ``Result``.

    Each method runs the DataFrame again (Spark is lazy); a tampered input page or a wrong
    key surfaces here as ``IntegrityError`` / ``KeyNotFound``. ``dataframe`` is the DataFrame.
    """

    def __init__(self, dataframe: DataFrame) -> None:
        super().__init__(None)
        self.dataframe = dataframe

    @property
    def columns(self) -> list[str]:
        return list(self.dataframe.columns)

    def to_arrow(self) -> pa.Table:
        with _spark_errors("the query's encrypted input"):
            return self.dataframe.toArrow()  # collected over pyspark's socket, not a file

    def record_batches(self, batch_size: int = 122_880) -> pa.RecordBatchReader:
        import pyarrow as pa

        table = self.to_arrow()
        return pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=batch_size))

    def rows(self) -> list[tuple[Any, ...]]:
        with _spark_errors("the query's encrypted input"):
            return [tuple(row) for row in self.dataframe.collect()]

    def show(self, max_rows: int = 20) -> None:
        with _spark_errors("the query's encrypted input"):
            self.dataframe.show(max_rows, truncate=False)

    def __repr__(self) -> str:
        return f"SparkResult(columns={self.columns})"


# --- the engine ------------------------------------------------------------------------------


class SparkEngine:
    """What ``TrustedContext(engine="spark")`` delegates to: one child session with this context's keys.

    Parameters: ``kms`` (a resolved ``KeyWrapper``: ``LocalKms`` or a ``Session``);
    ``spark=None`` (an existing session, checked; default ``secure_spark_session()``, which
    this engine then stops on ``close()`` if it created it); ``temp_directory=None`` (the
    parent of Spark's private local directory when the session is created here).
    """

    def __init__(
        self,
        kms: KeyWrapper,
        *,
        spark: SparkSession | None = None,
        temp_directory: str | os.PathLike[str] | None = None,
    ) -> None:
        kms_name, keks = exported_keks(kms)  # fails before a JVM starts for a remote KMS
        self.kms = kms
        self._owns_base = spark is None
        if spark is None:
            self._base = secure_spark_session(local_dir_parent=temp_directory)
        else:
            check_spark_security(spark)
            self._base = spark
        self._token = secrets.token_hex(16)
        self.spark = self._base.newSession()
        self.spark.conf.set(SECRET_KEYS_PROPERTY, secret_keys_value(keks))
        self.spark.conf.set(KMS_NAME_PROPERTY, kms_name)
        self.spark.conf.set(_ACCESS_TOKEN, self._token)
        self.spark.conf.set(_KMS_INSTANCE, f"enclaveml-{kms_name}")

    @property
    def local_directory(self) -> Path:
        return Path(self._base.sparkContext.getConf().get("spark.local.dir") or tempfile.gettempdir())

    # -- reading -------------------------------------------------------------------------

    def read(
        self, parts: list[Path], fmt: Literal["csv", "json", "parquet"], table: str, *, allow_plain: bool
    ) -> Result:
        if fmt == "parquet":
            frame = self._read_parquet(parts, allow_plain=allow_plain)
        else:
            # Verified to the last segment before Spark sees a row; over a socket into the JVM.
            arrow = TextTableReader(parts, fmt, self.kms, allow_plain=allow_plain).read()
            frame = self.spark.createDataFrame(arrow)
        frame.createOrReplaceTempView(table)
        return SparkResult(self.spark.table(table))

    def _read_parquet(self, parts: list[Path], *, allow_plain: bool) -> DataFrame:
        from enclaveml.crypto.parquet import parquet_flavour

        for part in parts:
            flavour = parquet_flavour(part)
            if flavour == "duckdb":
                raise ConfigError(
                    f"{part} is DuckDB-flavour encrypted Parquet, which Spark (parquet-mr) cannot read",
                    "convert it first: enclaveml.crypto.parquet.convert_parquet(src, dst, kms, key, to='standard')",
                )
            if flavour == "plain" and not allow_plain:
                raise ConfigError(
                    f"{part} is not encrypted", "pass allow_plain=True to read plaintext Parquet on purpose"
                )
        # The footers are decrypted here (schema), the pages when a query runs (SparkResult).
        with _spark_errors(parts[0] if len(parts) == 1 else parts[0].parent):
            return self.spark.read.parquet(*(str(p) for p in parts))

    def sql(self, query: str) -> Result:
        return SparkResult(self.spark.sql(query))

    def table(self, name: str) -> Result:
        return SparkResult(self.spark.table(name))

    # -- writing -------------------------------------------------------------------------

    def write(
        self,
        result: Result | pa.Table,
        target: Path,
        fmt: Literal["csv", "json", "parquet"],
        *,
        encrypted: bool,
        key: str,
        flavour: str,
    ) -> None:
        if fmt == "parquet" and isinstance(result, SparkResult) and flavour == "standard":
            self._write_parquet(result.dataframe, target, encrypted=encrypted, key=key)
            return
        # Results are collected to Arrow in the driver and written by our Python writers.
        table = result.to_arrow() if isinstance(result, Result) else result
        if fmt == "parquet" and encrypted:
            from enclaveml.crypto.parquet import write_encrypted_parquet

            write_encrypted_parquet(table, target, self.kms, key, flavour=flavour)  # type: ignore[arg-type]
            return
        if fmt == "parquet":
            import pyarrow.parquet as pq

            from enclaveml._atomic import atomic_output

            with atomic_output(target) as out:
                pq.write_table(table, out)
            return
        write_text_batches(table.to_reader(), target, fmt, kms=self.kms if encrypted else None, key=key)

    def _write_parquet(self, frame: DataFrame, target: Path, *, encrypted: bool, key: str) -> None:
        """One Parquet file at ``target``, all or nothing: Spark writes into a staging directory beside it."""
        if encrypted:
            self.kms.describe_key(key)  # unknown key: KeyNotFound before any Spark job
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".spark", dir=target.parent))
        try:
            writer = frame.coalesce(1).write.mode("overwrite")
            if encrypted:
                writer = writer.option(_UNIFORM_KEY, key)
            with _spark_errors("the query's encrypted input"):
                writer.parquet(str(staging / "out"))
            written = sorted((staging / "out").glob("part-*.parquet"))
            if len(written) != 1:
                raise ConfigError(f"Spark wrote {len(written)} Parquet parts for {target}, expected 1")
            written[0].chmod(0o600)
            written[0].replace(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.spark.conf.unset(SECRET_KEYS_PROPERTY)
            jvm: Any = self.spark.sparkContext._jvm
            jvm.org.apache.parquet.crypto.keytools.KeyToolkit.removeCacheEntriesForToken(self._token)
        if self._owns_base:
            stop_spark_session(self._base)
