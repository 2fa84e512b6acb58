"""`make demo`: the whole flow, end to end, through the real `enclaveml` command.

Foundation: init -> create-key -> datagen -> encrypt -> inspect -> decrypt -> byte-identical
check -> rotate -> rewrap -> decrypt again -> a tampered copy rejected (exit 4, no output).
Key broker: init -> (broker served in this process) -> enroll -> broker key -> encrypt with
it -> policy register -> `enclaveml run --verify-broker` of the attested SimpleQuery job
(encrypted answer, decrypted by the owner) -> a modified job refused (exit 3) -> audit
verify. Model serving: a model encrypted under a broker key -> `enclaveml serve` in sim mode,
whose key comes by attested release -> TLS requests (gRPC load client, KServe REST) -> the
prediction printed. Everything happens in ./demo-out; no server to start by hand.
"""

from __future__ import annotations

import filecmp
import json
import os
import re
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
        serving_demo(server.url, cert, as_owner, _env_with(ENCLAVEML_APP_ID=workload[0], ENCLAVEML_API_KEY=workload[1]))
    run("broker", "audit", "verify", "--db", db, "--root-key-file", "broker-root.key")
    print(f"broker demo finished in {time.perf_counter() - began:.1f} s")


def serving_demo(broker_url: str, broker_ca: Path, as_owner: dict[str, str], as_workload: dict[str, str]) -> None:
    """Model serving through the real CLI: `model encrypt --kms broker`, `certs oneway`, a policy
    for the server's measurement, `enclaveml serve` (sim TEE) that attests to the broker for the
    model key, then `serve-client` over TLS and one KServe v2 REST request whose answer is printed."""
    import httpx

    from enclaveml.serving.sample_models import sklearn_classifier_onnx

    began = time.perf_counter()
    print("\n== model serving: encrypted model, attested key release, TLS ==", flush=True)
    (OUT / "iris.onnx").write_bytes(sklearn_classifier_onnx())  # the owner's model, on the owner's machine
    print("  iris.onnx: a 3-class scikit-learn classifier exported to ONNX (4 float features)")
    run("kms", "--backend", "broker", "create-key", "models", env=as_owner)
    run("model", "encrypt", "iris.onnx", "-o", "models/iris/1/model.onnx.eml", "--key", "models", "--kms", "broker",
        env=as_owner)  # fmt: skip
    run("certs", "oneway", "--cn", "localhost", "-o", "certs")
    measurement = run("serve", "--tee", "sim", "--print-measurement").stdout.strip()
    policy = f'name = "iris-server"\ntee = ["sim"]\nallow_simulation = true\nmr_enclave = ["{measurement}"]\n'
    (OUT / "serve-policy.toml").write_text(policy)
    run("policy", "register", "serve-policy.toml", "--key", "models", env=as_owner)

    args = ["serve", "--model", "iris=models/iris", "--grpc-port", "0", "--rest-port", "0",
            "--tls-cert", "certs/server.crt", "--tls-key", "certs/server.key",
            "--keys-from", f"broker={broker_url}", "--key", "models", "--ca", str(broker_ca),
            "--tee", "sim"]  # fmt: skip
    print(f"$ enclaveml {' '.join(args)} &", flush=True)
    server = subprocess.Popen([*CLI, *args], cwd=OUT, env=as_workload, stderr=subprocess.PIPE, text=True)
    try:
        ports: tuple[str, str] | None = None
        assert server.stderr is not None
        for line in server.stderr:  # bounded: the server prints a few lines, then the model line or exits
            print(f"  {line.rstrip()}", flush=True)
            found = re.search(r"gRPC [\d.]+:(\d+), REST https://[\d.]+:(\d+)", line)
            ports = (found.group(1), found.group(2)) if found else ports
            if "available" in line or "not available" in line or "error" in line.lower():
                break
        if ports is None or server.poll() is not None:
            sys.exit("demo failed: the model server did not start")
        grpc_port, rest_port = ports
        ca = str(OUT / "certs" / "ca.crt")
        ready = httpx.get(f"https://127.0.0.1:{rest_port}/v2/health/ready", verify=ca, timeout=10)
        if ready.status_code != 200:
            sys.exit(f"demo failed: the model server is not ready: {ready.text}")
        run("serve-client", "--url", f"127.0.0.1:{grpc_port}", "--model", "iris", "-batch", "1", "-cnum", "2",
            "-loop", "50", "-ca", "certs/ca.crt")  # fmt: skip
        rows = [[5.1, 3.5, 1.4, 0.2], [-1.0, 0.5, -0.3, 2.0]]
        body = {"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": rows}]}
        infer = f"https://127.0.0.1:{rest_port}/v2/models/iris/infer"
        print(f"$ curl --cacert certs/ca.crt {infer} -d '{json.dumps(body)}'")
        answer = httpx.post(infer, json=body, verify=ca, timeout=10)
        answer.raise_for_status()
        for output in answer.json()["outputs"]:
            print(f"  {output['name']}: {output['data']}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"serving demo finished in {time.perf_counter() - began:.1f} s")


def _credentials(stdout: str) -> tuple[str, str]:
    fields = dict(line.split(":", 1) for line in stdout.strip().splitlines() if ":" in line)
    return fields["app id"].strip(), fields["api key"].strip()


broker_demo()
