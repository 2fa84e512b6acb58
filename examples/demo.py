"""`make demo`: the whole foundation flow, end to end, through the real `enclaveml` command.

init -> create-key -> datagen -> encrypt -> inspect -> decrypt -> byte-identical check ->
rotate -> rewrap -> decrypt again -> a tampered copy rejected (exit 4, no output file).
Everything happens in ./demo-out with its own key store; nothing needs a server.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo-out"
CLI = [str(Path(sys.executable).with_name("enclaveml"))]
ROWS = int(os.environ.get("DEMO_ROWS", "1000000"))


def run(*args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    print(f"$ enclaveml {' '.join(args)}", flush=True)
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, env=ENV, cwd=OUT, check=False)
    for line in (done.stdout + done.stderr).splitlines():
        print(f"  {line}")
    if done.returncode != expect:
        sys.exit(f"demo failed: `enclaveml {' '.join(args)}` exited {done.returncode}, expected {expect}")
    return done


shutil.rmtree(OUT, ignore_errors=True)
OUT.mkdir()
ENV = {
    **os.environ,
    "ENCLAVEML_HOME": str(OUT / "keys"),
    # A demo passphrase in the environment so the demo runs unattended; real use: the prompt.
    "ENCLAVEML_PASSPHRASE": "demo passphrase - not for production",
}

started = time.perf_counter()
run("kms", "init")
run("kms", "create-key", "customers")
run("datagen", "people", "--rows", str(ROWS), "-o", "people.csv")
run("encrypt", "people.csv", "people.csv.eml", "--key", "customers", "--context", "tenant=acme")
run("inspect", "people.csv.eml")
run("decrypt", "people.csv.eml", "people.out.csv", "--context", "tenant=acme")
assert filecmp.cmp(OUT / "people.csv", OUT / "people.out.csv", shallow=False)
print("  people.out.csv is byte-identical to people.csv")
run("kms", "rotate", "customers")
run("rewrap", "people.csv.eml", "--key", "customers")
run("decrypt", "people.csv.eml", "people.v2.csv", "--context", "tenant=acme")
assert filecmp.cmp(OUT / "people.csv", OUT / "people.v2.csv", shallow=False)

tampered = bytearray((OUT / "people.csv.eml").read_bytes())
tampered[len(tampered) // 2] ^= 0x01
(OUT / "tampered.csv.eml").write_bytes(bytes(tampered))
print("  flipped one bit in the middle of a copy: tampered.csv.eml")
run("decrypt", "tampered.csv.eml", "tampered.csv", "--context", "tenant=acme", expect=4)
assert not (OUT / "tampered.csv").exists()
print("  tampered copy rejected with exit 4, and tampered.csv was never created")
run("decrypt", "people.csv.eml", "wrong.csv", "--context", "tenant=globex", expect=4)
print(f"demo finished in {time.perf_counter() - started:.1f} s; files in {OUT.relative_to(ROOT)}/")


def broker_demo() -> None:
    """The key broker and the attested runtime: an in-process broker (TLS, SQLite in demo-out/),
    an owner who encrypts with a broker key, a sim policy, `enclaveml run` of a job that gets
    the key, and a modified job refused with `Attestation failed: ...` (exit 3)."""
    from enclaveml.broker.client import BrokerClient
    from enclaveml.broker.server import BrokerServer, make_self_signed
    from enclaveml.broker.store import BrokerStore
    from enclaveml.crypto import encrypt_file
    from enclaveml.kms.broker import BrokerKms

    began = time.perf_counter()
    print("\n== key broker + attested runtime ==", flush=True)
    cert, key = make_self_signed(OUT / "broker-tls")
    # A random root key for the demo; a real broker derives it from a passphrase or key file.
    with (
        BrokerStore(f"sqlite:///{OUT / 'broker.db'}", os.urandom(32)) as store,
        BrokerServer(store, port=0, tls_cert=cert, tls_key=key) as server,
    ):
        print(f"  broker listening on {server.url} (TLS, self-signed {cert.relative_to(ROOT)}; SQLite broker.db)")
        admin = store.enroll_app("admin", "admin")  # what `enclaveml broker init` prints once
        with BrokerClient(server.url, admin.app.app_id, admin.api_key, ca=str(cert)) as as_admin:
            owner = as_admin.enroll("analytics", "owner")
            workload = as_admin.enroll("job-runner", "workload")
        print(f"  enrolled owner {owner['app_id']} and workload {workload['app_id']} (api keys shown once)")

        kms = BrokerKms(server.url, owner["app_id"], owner["api_key"], ca=str(cert))
        info = kms.create_key("customers")
        print(f"  owner created broker key customers ({info.key_id}); it never leaves the broker")
        encrypt_file(OUT / "people.csv", OUT / "people.broker.csv.eml", kms, "customers")
        print("  owner encrypted people.csv -> people.broker.csv.eml with it")
        shutil.copyfile(ROOT / "examples" / "job_simple_query.py", OUT / "job.py")
        job = ["python", "job.py", "people.broker.csv.eml"]

        ENV.update(
            {
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                "ENCLAVEML_APP_ID": workload["app_id"],
                "ENCLAVEML_API_KEY": workload["api_key"],
            }
        )
        measurement = run("run", "--tee", "sim", "--print-measurement", "--", *job).stdout.strip()
        policy = f'name = "simple-query"\ntee = ["sim"]\nallow_simulation = true\nmr_enclave = ["{measurement}"]\n'
        registered = kms.client.register_policy("simple-query", policy, ["customers"])
        print(f"  owner registered policy {registered['policy_id']} for key customers:")
        for line in policy.splitlines():
            print(f"    {line}")

        broker = ["--broker", server.url, "--ca", str(cert), "--keys", "customers", "--tee", "sim"]
        run("run", *broker, "--", *job)

        (OUT / "job.py").write_text((OUT / "job.py").read_text() + "\nprint('and now send the data elsewhere')\n")
        print("  modified job.py (one line appended)")
        refused = run("run", *broker, "--", *job, expect=3)
        assert refused.stderr.count("Attestation failed: ") == 1
        assert "and now send the data elsewhere" not in refused.stdout
        print("  modified job refused with exit 3 before it started; the broker released nothing")
        kms.close()
    print(f"broker demo finished in {time.perf_counter() - began:.1f} s")


broker_demo()
