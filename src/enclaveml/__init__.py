"""enclaveml: privacy-preserving machine learning on confidential computing.

Data, models and keys stay encrypted everywhere except inside an attested TEE. The
foundation is a streaming encrypted container (EML v1) under envelope encryption::

    enclaveml kms init
    enclaveml kms create-key customers
    enclaveml encrypt people.csv people.csv.eml --key customers
    enclaveml decrypt people.csv.eml people.csv

See ``enclaveml.crypto`` for the Python API and ``docs/format.md`` for the format.

Inside a job started by ``enclaveml run``, ``enclaveml.session()`` holds the keys the broker
released to it::

    with enclaveml.session() as s:
        s.decrypt_file("people.csv.eml", "people.csv")
"""

from enclaveml._version import __version__
from enclaveml.runtime.session import session

__all__ = ["__version__", "session"]
