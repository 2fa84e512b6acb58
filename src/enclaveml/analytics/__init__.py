"""Trusted analytics: SQL on encrypted CSV, JSON and Parquet, decrypted only in memory.

Example, with the embedded key store (inside ``enclaveml run``, ``kms`` defaults to the
keys attestation released)::

    from enclaveml.analytics import TrustedContext

    with TrustedContext(engine="duckdb", kms=kms) as ctx:
        ctx.read("people.csv.eml", format="csv")  # table `people`
        adults = ctx.sql("select job, count(*) n, avg(salary) from people where age between 20 and 40 group by job")
        ctx.write(adults, "adults.csv.eml", format="csv", key="customers")

Importing this package loads neither DuckDB nor pyarrow; ``TrustedContext`` does when used.
See ``docs/analytics.md``.
"""

from enclaveml.analytics.context import Result, TrustedContext

__all__ = ["Result", "TrustedContext"]
