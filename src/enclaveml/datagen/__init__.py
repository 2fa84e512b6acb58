"""Deterministic synthetic data sets for examples and benchmarks.

Example::

    >>> from enclaveml.datagen import people_table, write_people_csv
    >>> table = people_table(3, seed=42)
    >>> table.column_names
    ['name', 'age', 'job', 'city', 'salary']
    >>> import io
    >>> buf = io.BytesIO()
    >>> write_people_csv(buf, 3, seed=42)
    3
    >>> buf.getvalue().splitlines()[0]
    b'name,age,job,city,salary'

From the command line: ``enclaveml datagen people --rows 1000000 -o people.csv --seed 42``.
"""

from __future__ import annotations

from enclaveml.datagen.people import CHUNK_ROWS, PEOPLE_COLUMNS, people_table, write_people_csv

__all__ = ["CHUNK_ROWS", "PEOPLE_COLUMNS", "people_table", "write_people_csv"]
