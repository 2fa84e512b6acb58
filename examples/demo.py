"""`make demo`: the whole flow, end to end, through the real `enclaveml` command.

Foundation: init -> create-key -> datagen -> encrypt -> inspect -> decrypt -> byte-identical
check -> rotate -> rewrap -> decrypt again -> a tampered copy rejected (exit 4, no output).
Key broker: init -> (broker served in this process) -> enroll -> broker key -> encrypt with
it -> policy register -> `enclaveml run --verify-broker` of the attested SimpleQuery job
(encrypted answer, decrypted by the owner) -> a modified job refused (exit 3) -> audit
verify. Everything happens in ./demo-out; no server to start.
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


def run(*args: str, expect: int = 0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    print(f"$ enclaveml {' '.join(args)}", flush=True)
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, env=env or ENV, cwd=OUT, check=False)
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


def _env_with(**values: str) -> dict[str, str]:
    return {**ENV, **values}


def broker_demo() -> None:
    """The key broker and the attested runtime, through the real CLI: `broker init`, a broker
    served in this process (TLS, SQLite in demo-out/, attesting itself with simulated
    evidence), `broker enroll`, `kms --backend broker create-key`, `encrypt --kms broker`,
    `policy register`, `enclaveml run --verify-broker` of a job that gets the key, a modified
    job refused with `Attestation failed: ...` (exit 3), and `broker audit verify`."""
    from enclaveml.attestation.sim import SimulationKey
    from enclaveml.attestation.tee import SimulatedTee
    from enclaveml.broker.root_key import read_root_key_file
    from enclaveml.broker.server import BrokerServer, make_self_signed
    from enclaveml.broker.store import BrokerStore
    from enclaveml.runtime.run import broker_sim_measurement

    began = time.perf_counter()
    print("\n== key broker + attested runtime ==", flush=True)
    db = f"sqlite:///{OUT / 'broker.db'}"
    ENV["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    run("broker", "init", "--db", db, "--root-key-file", "broker-root.key")
    cert, key = make_self_signed(OUT / "broker-tls")
    # The broker proves itself too (bi-attestation); here with simulated evidence over the
    # installed enclaveml package, as `broker serve --attest-self sim` does.
    broker_self = SimulatedTee(SimulationKey.generate(), broker_sim_measurement(), b"")
    with (
        BrokerStore(db, read_root_key_file(OUT / "broker-root.key")) as store,
        BrokerServer(store, port=0, tls_cert=cert, tls_key=key, self_tee=broker_self) as server,
    ):
        print(f"  broker serving {server.url} in this process (what `enclaveml broker serve --self-signed` runs)")
        ENV.update({"ENCLAVEML_BROKER_URL": server.url, "ENCLAVEML_BROKER_CA": str(cert)})
        owner = _credentials(run("broker", "enroll", "--name", "analytics", "--role", "owner").stdout)
        workload = _credentials(run("broker", "enroll", "--name", "job-runner", "--role", "workload").stdout)
        as_owner = _env_with(ENCLAVEML_APP_ID=owner[0], ENCLAVEML_API_KEY=owner[1])
        run("kms", "--backend", "broker", "create-key", "customers", env=as_owner)
        run("encrypt", "people.csv", "people.broker.csv.eml", "--kms", "broker", "--key", "customers", env=as_owner)
        # The seeds' SimpleQuery (examples/simple_query.py) as the attested job: it reads the
        # encrypted people file with the released key and writes its answer encrypted.
        shutil.copyfile(ROOT / "examples" / "simple_query.py", OUT / "job.py")
        job = ["python", "job.py", "people.broker.csv.eml", "adults.csv.eml", "--kms", "session"]

        as_workload = _env_with(ENCLAVEML_APP_ID=workload[0], ENCLAVEML_API_KEY=workload[1])
        measurement = run("run", "--tee", "sim", "--print-measurement", "--", *job, env=as_workload).stdout.strip()
        policy = f'name = "simple-query"\ntee = ["sim"]\nallow_simulation = true\nmr_enclave = ["{measurement}"]\n'
        (OUT / "policy.toml").write_text(policy)
        run("policy", "register", "policy.toml", "--key", "customers", env=as_owner)
        (OUT / "broker-policy.toml").write_text(
            f'name = "our-broker"\ntee = ["sim"]\nallow_simulation = true\n'
            f'mr_enclave = ["{broker_self.measurement.hex()}"]\n'
        )
        broker = ["--broker", server.url, "--ca", str(cert), "--keys", "customers", "--tee", "sim"]
        verify = ["--verify-broker", "broker-policy.toml"]
        run("run", *broker, *verify, "--", *job, env=as_workload)
        run("decrypt", "adults.csv.eml", "adults.csv", "--kms", "broker", env=as_owner)
        print("  the owner decrypted the job's encrypted answer:")
        for line in (OUT / "adults.csv").read_text().splitlines()[:4]:
            print(f"    {line}")

        (OUT / "job.py").write_text((OUT / "job.py").read_text() + "\nprint('and now send the data elsewhere')\n")
        print("  modified job.py (one line appended)")
        refused = run("run", *broker, *verify, "--", *job, env=as_workload, expect=3)
        assert refused.stderr.count("Attestation failed: ") == 1
        assert "and now send the data elsewhere" not in refused.stdout
        print("  modified job refused with exit 3 before it started; the broker released nothing")
    run("broker", "audit", "verify", "--db", db, "--root-key-file", "broker-root.key")
    print(f"broker demo finished in {time.perf_counter() - began:.1f} s")


def _credentials(stdout: str) -> tuple[str, str]:
    fields = dict(line.split(":", 1) for line in stdout.strip().splitlines() if ":" in line)
    return fields["app id"].strip(), fields["api key"].strip()


broker_demo()
