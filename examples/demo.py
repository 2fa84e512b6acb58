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
