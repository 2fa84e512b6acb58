"""Child process for the HTTP crash test: a real broker (uvicorn, TLS) on an existing store.

Usage: ``python serve_child.py URL ROOT_KEY_HEX CERT KEY``. Opens the store, serves it on
127.0.0.1 at a free port and prints ``https://127.0.0.1:PORT`` on one flushed line once it
listens; then serves until its stdin is closed (a clean stop) or it is killed.
"""

from __future__ import annotations

import logging
import sys

from enclaveml.broker.server import BrokerServer
from enclaveml.broker.store import BrokerStore


def main() -> None:
    url, root_key, cert, key = sys.argv[1], bytes.fromhex(sys.argv[2]), sys.argv[3], sys.argv[4]
    # One "INSECURE: simulated evidence" warning per release would only fill the log file.
    logging.getLogger("enclaveml.attestation").setLevel(logging.ERROR)
    with BrokerStore(url, root_key) as store:
        server = BrokerServer(store, "127.0.0.1", 0, tls_cert=cert, tls_key=key).start()
        print(server.url, flush=True)
        sys.stdin.read()  # until the parent closes our stdin
        server.stop()


if __name__ == "__main__":
    main()
