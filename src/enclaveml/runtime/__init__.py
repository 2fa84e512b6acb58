"""The attested runtime: ``enclaveml run`` (``run.py``) and the job's side (``session.py``).

A job reads its keys with ``enclaveml.session()``. (``session`` is not re-exported here: it
would hide the ``enclaveml.runtime.session`` module behind the function of the same name.)
"""

__all__: list[str] = []
