"""Child process for the group-commit crash test: concurrent key releases until killed.

Usage: ``python release_threads_child.py URL ROOT_KEY_HEX POLICY_ID THREADS``. Each thread
loops: a fresh attestation nonce, ``release_key_material(nonce=...)`` of key ``customers``,
then ``released NONCE`` on one flushed line — printed only once the release returned, that
is once the group commit that holds it committed.
"""

from __future__ import annotations

import sys
import threading
from datetime import timedelta

from enclaveml.broker.store import BrokerStore


def main() -> None:
    url, root_key, policy_id, threads = sys.argv[1], bytes.fromhex(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    printing = threading.Lock()
    with BrokerStore(url, root_key) as store:

        def loop() -> None:
            for _ in range(100_000):
                issued = store.issue_nonce("attest", timedelta(minutes=5))
                nonce = store.check_nonce(issued.value, "attest", actor="a-crash")
                store.release_key_material(policy_id, "customers", actor="a-crash", nonce=nonce)
                with printing:
                    print("released", issued.value, flush=True)

        workers = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()


if __name__ == "__main__":
    main()
