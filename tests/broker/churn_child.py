"""Child process for the crash test: creates keys and releases them in a loop until killed.

Usage: ``python churn_child.py URL ROOT_KEY_HEX``. Prints ``created NAME KEY_ID`` after each
key creation commits and ``released NAME`` after each release commits, flushing each line.
"""

from __future__ import annotations

import sys

from broker_testdata import POLICY_TOML

from enclaveml.broker.store import BrokerStore


def main() -> None:
    url, root_key = sys.argv[1], bytes.fromhex(sys.argv[2])
    with BrokerStore(url, root_key) as store:
        for i in range(100_000):
            name = f"churn-{i}"
            key = store.create_key(name, actor="churn")
            print("created", name, key.key_id, flush=True)
            policy = store.register_policy(f"policy-{i}", POLICY_TOML, [name], actor="churn")
            store.release_key_material(policy.policy_id, name, actor="churn")
            print("released", name, flush=True)


if __name__ == "__main__":
    main()
