"""Constants shared by the broker store tests and the crash-test child (a unique module name,
so ``import`` never picks another directory's ``conftest``)."""

from __future__ import annotations

ROOT_KEY = bytes(range(32))

POLICY_TOML = """\
name = "training-job"
tee = ["sgx"]
mr_enclave = ["33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"]
mr_signer = ["815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"]
"""
