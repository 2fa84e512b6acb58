"""Compile the Spark engine's Java KmsClient into src/enclaveml/analytics/jars/ (run by `make install`)."""

from __future__ import annotations

import sys

from enclaveml.analytics.spark_jar import build_kms_client_jar
from enclaveml.errors import EnclaveMLError


def main() -> int:
    try:
        jar = build_kms_client_jar()
    except EnclaveMLError as exc:
        print(f"build_java: {exc}", file=sys.stderr)
        return 2
    print(f"built {jar}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
