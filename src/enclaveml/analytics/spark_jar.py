"""The Java ``KmsClient`` jar that lets Spark (parquet-mr) wrap and unwrap keys like our Python code.

Source: ``java/ai/enclaveml/parquet/EnclaveKmsClient.java`` at the repository root. It is
compiled at install time (``make install`` runs ``scripts/build_java.py``) with the JDK's
``javac`` against pyspark's own jars, into ``src/enclaveml/analytics/jars/`` (git-ignored).
``kms_client_jar()`` builds it on first use when it is missing or older than its source.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

from enclaveml.errors import ConfigError

__all__ = ["JAR_PATH", "JAVA_SOURCE", "KMS_CLIENT_CLASS", "build_kms_client_jar", "kms_client_jar"]

KMS_CLIENT_CLASS = "ai.enclaveml.parquet.EnclaveKmsClient"
JAR_PATH = Path(__file__).parent / "jars" / "enclaveml-parquet-kms.jar"
# src/enclaveml/analytics/ → the repository root (an editable install, as `make install` does)
JAVA_SOURCE = Path(__file__).resolve().parents[3] / "java" / "ai" / "enclaveml" / "parquet" / "EnclaveKmsClient.java"


def _pyspark_jars() -> Path:
    try:
        import pyspark
    except ImportError:
        raise ConfigError("pyspark is not installed", "install enclaveml with the spark extra") from None
    jars = Path(pyspark.__file__).parent / "jars"
    if not jars.is_dir():
        raise ConfigError(f"pyspark has no jars directory at {jars}", "reinstall pyspark from PyPI")
    return jars


def build_kms_client_jar(source: Path = JAVA_SOURCE, jar: Path = JAR_PATH) -> Path:
    """Compile ``source`` against pyspark's jars into ``jar`` (replaced atomically); returns ``jar``."""
    javac = shutil.which("javac")
    if javac is None:
        raise ConfigError(
            "javac is not on PATH: the Spark engine needs its Java KmsClient compiled",
            "install a JDK (17 or newer), then run `python scripts/build_java.py`",
        )
    if not source.is_file():
        raise ConfigError(f"the KmsClient source {source} is missing", "reinstall enclaveml from a clone")
    jar.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="enclaveml-javac-") as work:
        classes = Path(work) / "classes"
        command = [javac, "--release", "17", "-nowarn", "-d", str(classes)]
        command += ["-cp", str(_pyspark_jars() / "*"), str(source)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ConfigError(f"javac failed to compile {source.name}: {done.stderr.strip()[:500]}")
        fd, tmp_name = tempfile.mkstemp(prefix=f".{jar.name}.", suffix=".tmp", dir=jar.parent)
        os.close(fd)
        try:
            with zipfile.ZipFile(tmp_name, "w", zipfile.ZIP_DEFLATED) as out:
                out.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\r\nCreated-By: enclaveml\r\n\r\n")
                for item in sorted(classes.rglob("*.class")):
                    out.write(item, item.relative_to(classes).as_posix())
            os.chmod(tmp_name, 0o644)
            os.replace(tmp_name, jar)
        finally:
            Path(tmp_name).unlink(missing_ok=True)
    return jar


def kms_client_jar() -> Path:
    """The jar's path, built first if it is missing or older than its source (when the source is here)."""
    stale = JAVA_SOURCE.is_file() and (not JAR_PATH.is_file() or JAR_PATH.stat().st_mtime < JAVA_SOURCE.stat().st_mtime)
    if stale or not JAR_PATH.is_file():
        build_kms_client_jar()
    return JAR_PATH
