"""The local KMS, told as a story: a key store is created, used, rotated, pruned and attacked."""

from __future__ import annotations

import base64
import dataclasses
import json
import multiprocessing
import re
import stat
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from enclaveml.errors import (
    AuthError,
    ConfigError,
    EnclaveMLError,
    IntegrityError,
    KeyNotFound,
    KeyStoreCorrupted,
)
from enclaveml.kms import (
    SCRYPT_DEFAULT,
    SCRYPT_FAST_FOR_TESTS,
    KeyInfo,
    KeyManagementService,
    KeyVersionInfo,
    LocalKms,
    ScryptParams,
    WrappedKey,
)

PASSPHRASE = "correct horse battery staple \N{HORSE}"
T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
T1 = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
DATA_KEY = bytes(range(32))
AD = b"bound header of file A"


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "home" / "keystore.json"


@pytest.fixture
def kms(store: Path) -> LocalKms:
    kms = LocalKms.init(store, PASSPHRASE, kdf=SCRYPT_FAST_FOR_TESTS, now=T0)
    kms.create_key("training-data", now=T0)
    return kms


def read_doc(store: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(store.read_text())
    return doc


def write_doc(store: Path, doc: dict[str, Any]) -> None:
    store.write_text(json.dumps(doc))


def unseal_independently(store: Path, passphrase: str = PASSPHRASE) -> dict[str, Any]:
    """Open the store following only the documented format, not the module's code."""
    doc = read_doc(store)
    kdf = doc["kdf"]
    master = Scrypt(salt=base64.b64decode(kdf["salt"]), length=32, n=2 ** kdf["log_n"], r=kdf["r"], p=kdf["p"]).derive(
        passphrase.encode()
    )
    seal_key = HKDF(hashes.SHA256(), 32, None, b"enclaveml keystore seal").derive(master)
    aad = json.dumps(
        {"format": doc["format"], "version": doc["version"], "kdf": kdf},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    plain = AESGCM(seal_key).decrypt(base64.b64decode(doc["nonce"]), base64.b64decode(doc["sealed"]), aad)
    payload: dict[str, Any] = json.loads(plain)
    return payload


def secret_spellings(store: Path) -> list[str]:
    """The passphrase, the data key and every key version's material, in hex and base64."""
    raw = [DATA_KEY] + [
        base64.b64decode(v["material"])
        for k in unseal_independently(store)["keys"]
        for v in k["versions"]
        if v["material"] is not None
    ]
    return [PASSPHRASE] + [s for b in raw for s in (b.hex(), b.hex().upper(), base64.b64encode(b).decode())]


# -- chapter 1: a new key store ----------------------------------------------------------


def test_init_create_wrap_unwrap_round_trip(store: Path) -> None:
    kms = LocalKms.init(store, PASSPHRASE, kdf=SCRYPT_FAST_FOR_TESTS, now=T0)
    assert kms.list_keys() == []

    info = kms.create_key("training-data", now=T0)
    assert re.fullmatch(r"k-[0-9a-f]{16}", info.key_id)
    assert info == KeyInfo("local", info.key_id, "training-data", T0, 1, (KeyVersionInfo(1, T0, "enabled"),))

    wrapped = kms.wrap_data_key("training-data", DATA_KEY, AD)
    assert (wrapped.kms, wrapped.key_id, wrapped.key_version) == ("local", info.key_id, 1)
    assert len(wrapped.ciphertext) == 60
    assert kms.unwrap_data_key(wrapped, AD) == DATA_KEY
    # by key id as well as by name
    assert kms.describe_key(info.key_id) == info
    assert kms.unwrap_data_key(kms.wrap_data_key(info.key_id, DATA_KEY, AD), AD) == DATA_KEY


def test_store_layout_matches_the_documented_format(kms: LocalKms, store: Path) -> None:
    doc = read_doc(store)
    assert sorted(doc) == ["check", "format", "kdf", "nonce", "sealed", "version"]
    assert (doc["format"], doc["version"]) == ("enclaveml-keystore", 1)
    assert {k: v for k, v in doc["kdf"].items() if k != "salt"} == {
        "name": "scrypt",
        "log_n": 12,
        "r": 8,
        "p": 1,
    }
    assert len(base64.b64decode(doc["kdf"]["salt"])) == 16
    assert len(base64.b64decode(doc["check"])) == 32
    assert len(base64.b64decode(doc["nonce"])) == 12
    (key,) = unseal_independently(store)["keys"]
    assert key["name"] == "training-data"
    assert key["versions"] == [
        {
            "version": 1,
            "created": T0.isoformat(),
            "state": "enabled",
            "material": key["versions"][0]["material"],
        }
    ]
    assert len(base64.b64decode(key["versions"][0]["material"])) == 32


def test_store_is_private(kms: LocalKms, store: Path) -> None:
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.parent.stat().st_mode) == 0o700
    kms.rotate_key("training-data")  # rewrites keep the mode
    assert stat.S_IMODE(store.stat().st_mode) == 0o600


def test_every_write_reseals_with_a_fresh_nonce_and_the_same_kdf(kms: LocalKms, store: Path) -> None:
    before = read_doc(store)
    kms.create_key("second")
    after = read_doc(store)
    assert after["kdf"] == before["kdf"]
    assert after["check"] == before["check"]
    assert after["nonce"] != before["nonce"]


def test_init_refuses_an_existing_store(kms: LocalKms, store: Path) -> None:
    with pytest.raises(ConfigError, match="already exists") as exc:
        LocalKms.init(store, "another passphrase", kdf=SCRYPT_FAST_FOR_TESTS)
    assert "ENCLAVEML_HOME" in exc.value.hint


def test_opening_a_missing_store_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no key store") as exc:
        LocalKms(tmp_path / "nothing.json", PASSPHRASE)
    assert "enclaveml kms init" in exc.value.hint


def test_scrypt_parameters_have_a_floor() -> None:
    with pytest.raises(ValueError, match="log_n"):
        ScryptParams(log_n=11, r=8, p=1)
    assert ScryptParams(log_n=17, r=8, p=1) == SCRYPT_DEFAULT


def test_local_kms_implements_the_protocol(kms: LocalKms) -> None:
    assert isinstance(kms, KeyManagementService)
    assert kms.kms_name == "local"


# -- chapter 2: reopening, and the disk as the truth ---------------------------------------


def test_reopen_with_the_same_passphrase(kms: LocalKms, store: Path) -> None:
    wrapped = kms.wrap_data_key("training-data", DATA_KEY, AD)
    again = LocalKms(store, PASSPHRASE)
    assert again.list_keys() == kms.list_keys()
    assert again.unwrap_data_key(wrapped, AD) == DATA_KEY


def test_reads_see_changes_made_by_another_instance(kms: LocalKms, store: Path) -> None:
    other = LocalKms(store, PASSPHRASE)
    other.create_key("made-elsewhere", now=T1)
    assert [k.name for k in kms.list_keys()] == ["training-data", "made-elsewhere"]
    assert kms.describe_key("made-elsewhere").created == T1


def test_names_are_validated(kms: LocalKms) -> None:
    for bad in [
        "",
        "-leading-dash",
        ".hidden",
        "has space",
        "slash/name",
        "é",
        "a" * 65,
        "k-0123456789abcdef",
    ]:
        with pytest.raises(ConfigError, match="invalid key name"):
            kms.create_key(bad)
    assert kms.create_key("a" * 64).name == "a" * 64
    assert kms.create_key("9.model_v2-final").name == "9.model_v2-final"


def test_duplicate_names_are_refused(kms: LocalKms) -> None:
    with pytest.raises(ConfigError, match="key training-data already exists") as exc:
        kms.create_key("training-data")
    assert "rotate" in exc.value.hint
    assert len(kms.list_keys()) == 1


def test_unknown_names_are_key_not_found(kms: LocalKms) -> None:
    with pytest.raises(KeyNotFound, match="no key 'nope' in key store"):
        kms.describe_key("nope")
    with pytest.raises(KeyNotFound):
        kms.wrap_data_key("nope", DATA_KEY, AD)


# -- chapter 3: rotation and destruction ---------------------------------------------------


def test_rotate_new_wraps_use_v2_and_v1_still_unwraps(kms: LocalKms) -> None:
    old = kms.wrap_data_key("training-data", DATA_KEY, AD)
    info = kms.rotate_key("training-data", now=T1)
    assert info.primary_version == 2
    assert info.versions == (KeyVersionInfo(1, T0, "enabled"), KeyVersionInfo(2, T1, "enabled"))

    new = kms.wrap_data_key("training-data", DATA_KEY, AD)
    assert (old.key_version, new.key_version) == (1, 2)
    assert kms.unwrap_data_key(old, AD) == DATA_KEY
    assert kms.unwrap_data_key(new, AD) == DATA_KEY


def test_destroy_v1_makes_its_wraps_unrecoverable(kms: LocalKms, store: Path) -> None:
    old = kms.wrap_data_key("training-data", DATA_KEY, AD)
    kms.rotate_key("training-data", now=T1)
    new = kms.wrap_data_key("training-data", DATA_KEY, AD)

    info = kms.destroy_key_version("training-data", 1)
    assert info.primary_version == 2
    assert info.versions == (KeyVersionInfo(1, T0, "destroyed"), KeyVersionInfo(2, T1, "enabled"))
    with pytest.raises(KeyNotFound, match="key training-data version 1 was destroyed"):
        kms.unwrap_data_key(old, AD)
    assert kms.unwrap_data_key(new, AD) == DATA_KEY
    # the material is gone from the store, not merely flagged
    (key,) = unseal_independently(store)["keys"]
    assert [v["material"] is None for v in key["versions"]] == [True, False]
    # destroying twice is a no-op
    assert kms.destroy_key_version("training-data", 1) == info


def test_destroy_refuses_the_last_enabled_version(kms: LocalKms) -> None:
    with pytest.raises(ConfigError, match="only enabled version") as exc:
        kms.destroy_key_version("training-data", 1)
    assert "rotate" in exc.value.hint
    with pytest.raises(KeyNotFound, match="no version 5"):
        kms.destroy_key_version("training-data", 5)


def test_primary_is_the_highest_enabled_version(kms: LocalKms) -> None:
    kms.rotate_key("training-data")
    kms.rotate_key("training-data")
    assert kms.destroy_key_version("training-data", 3).primary_version == 2
    assert kms.wrap_data_key("training-data", DATA_KEY, AD).key_version == 2
    assert kms.rotate_key("training-data").primary_version == 4  # numbers are never reused


def test_the_runtime_export_holds_every_enabled_version_and_hides_it_in_repr(kms: LocalKms, store: Path) -> None:
    other = kms.create_key("other")
    kms.rotate_key("training-data")
    kms.rotate_key("training-data")
    kms.destroy_key_version("training-data", 2)
    training = kms.describe_key("training-data")

    exported = kms.export_secret_keys_for_trusted_runtime()

    sealed = {
        (k["key_id"], v["version"]): base64.b64decode(v["material"])
        for k in unseal_independently(store)["keys"]
        for v in k["versions"]
        if v["material"] is not None
    }
    assert [(k.name, k.key_id, k.version) for k in exported] == [
        ("training-data", training.key_id, 1),
        ("training-data", training.key_id, 3),
        ("other", other.key_id, 1),
    ]
    assert {(k.key_id, k.version): k.material for k in exported} == sealed
    assert not [k for k in exported if k.material.hex() in repr(k) or base64.b64encode(k.material).decode() in repr(k)]


def test_the_runtime_export_verifies_the_store_first(kms: LocalKms, store: Path) -> None:
    doc = read_doc(store)
    write_doc(store, doc | {"sealed": doc["sealed"][:-8] + "AAAAAAA="})

    with pytest.raises(KeyStoreCorrupted):
        kms.export_secret_keys_for_trusted_runtime()


# -- chapter 4: wrapped keys presented in the wrong place ----------------------------------


def test_wrong_associated_data_is_an_integrity_error(kms: LocalKms) -> None:
    wrapped = kms.wrap_data_key("training-data", DATA_KEY, AD)
    with pytest.raises(IntegrityError, match="does not unwrap"):
        kms.unwrap_data_key(wrapped, b"bound header of file B")


def test_relabelled_wrapped_keys_do_not_unwrap(kms: LocalKms) -> None:
    other = kms.create_key("other")
    wrapped = kms.wrap_data_key("training-data", DATA_KEY, AD)
    kms.rotate_key("training-data")

    def relabel(**changes: Any) -> WrappedKey:
        return dataclasses.replace(wrapped, **changes)

    with pytest.raises(IntegrityError):  # existing version, wrong material
        kms.unwrap_data_key(relabel(key_version=2), AD)
    with pytest.raises(IntegrityError):  # existing key, wrong material
        kms.unwrap_data_key(relabel(key_id=other.key_id), AD)
    with pytest.raises(KeyNotFound, match="key training-data has no version 7"):
        kms.unwrap_data_key(relabel(key_version=7), AD)
    with pytest.raises(KeyNotFound, match="key k-ffffffffffffffff is not in key store"):
        kms.unwrap_data_key(relabel(key_id="k-ffffffffffffffff"), AD)
    with pytest.raises(KeyNotFound, match="held by the 'vault' KMS"):
        kms.unwrap_data_key(relabel(kms="vault"), AD)
    with pytest.raises(IntegrityError, match="wrong length"):
        kms.unwrap_data_key(relabel(ciphertext=wrapped.ciphertext[:-1]), AD)


# -- chapter 5: the store under attack -----------------------------------------------------


def test_wrong_passphrase_is_an_auth_error(kms: LocalKms, store: Path) -> None:
    with pytest.raises(AuthError) as exc:
        LocalKms(store, PASSPHRASE + "!")
    assert str(exc.value) == f"wrong passphrase for key store {store}"


def test_one_flipped_byte_in_sealed_is_detected(kms: LocalKms, store: Path) -> None:
    doc = read_doc(store)
    sealed = bytearray(base64.b64decode(doc["sealed"]))
    sealed[len(sealed) // 2] ^= 0x01
    write_doc(store, doc | {"sealed": base64.b64encode(bytes(sealed)).decode()})
    with pytest.raises(KeyStoreCorrupted) as exc:
        LocalKms(store, PASSPHRASE)
    assert str(exc.value) == f"key store {store} failed its integrity check"
    with pytest.raises(KeyStoreCorrupted):
        kms.list_keys()  # an open instance re-reads the disk too


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda raw: raw[: len(raw) // 2], id="truncated"),
        pytest.param(lambda raw: b"", id="empty"),
        pytest.param(lambda raw: b"\xff\xfe not json", id="not-json"),
        pytest.param(lambda raw: b"[1, 2, 3]", id="json-list"),
        pytest.param(lambda raw: raw.replace(b'"nonce"', b'"n0nce"'), id="missing-field"),
        pytest.param(lambda raw: raw.replace(b'"sealed": "', b'"sealed": "!'), id="bad-base64"),
    ],
)
def test_damaged_store_is_corrupted(kms: LocalKms, store: Path, damage: Callable[[bytes], bytes]) -> None:
    store.write_bytes(damage(store.read_bytes()))
    with pytest.raises(KeyStoreCorrupted, match="failed its integrity check"):
        LocalKms(store, PASSPHRASE)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        # in-range KDF changes derive other keys: indistinguishable from a wrong passphrase
        pytest.param({"log_n": 13}, AuthError, id="log_n"),
        pytest.param({"r": 4}, AuthError, id="r"),
        pytest.param({"salt": base64.b64encode(bytes(16)).decode()}, AuthError, id="salt"),
        # the check still passes but the sealed blob's associated data no longer matches
        pytest.param({"extra": 1}, KeyStoreCorrupted, id="extra-field"),
        # refused before deriving: out of range, or not scrypt
        pytest.param({"log_n": 40}, KeyStoreCorrupted, id="log_n-huge"),
        pytest.param({"log_n": 11}, KeyStoreCorrupted, id="log_n-weak"),
        pytest.param({"name": "pbkdf2"}, KeyStoreCorrupted, id="name"),
        pytest.param({"log_n": "12"}, KeyStoreCorrupted, id="log_n-string"),
    ],
)
def test_tampered_kdf_parameters(
    kms: LocalKms, store: Path, change: dict[str, Any], error: type[EnclaveMLError]
) -> None:
    doc = read_doc(store)
    write_doc(store, doc | {"kdf": doc["kdf"] | change})
    with pytest.raises(error) as exc:
        LocalKms(store, PASSPHRASE)
    assert type(exc.value) is error


def test_unsupported_store_version(kms: LocalKms, store: Path) -> None:
    write_doc(store, read_doc(store) | {"version": 2})
    with pytest.raises(KeyStoreCorrupted, match="unsupported version 2"):
        LocalKms(store, PASSPHRASE)


def test_secrets_never_appear_in_errors_or_on_disk(kms: LocalKms, store: Path) -> None:
    kms.rotate_key("training-data")
    wrapped = kms.wrap_data_key("training-data", DATA_KEY, AD)
    secrets = secret_spellings(store)
    assert len(secrets) == 1 + 3 * 3

    on_disk = store.read_text()
    assert not [s for s in secrets if s in on_disk]

    errors: list[EnclaveMLError] = []

    def collect(action: Callable[[], object]) -> None:
        with pytest.raises(EnclaveMLError) as exc:
            action()
        errors.append(exc.value)

    collect(lambda: kms.unwrap_data_key(wrapped, b"other"))
    collect(lambda: kms.unwrap_data_key(WrappedKey("local", wrapped.key_id, 9, wrapped.ciphertext), AD))
    collect(lambda: kms.unwrap_data_key(WrappedKey("vault", wrapped.key_id, 2, wrapped.ciphertext), AD))
    collect(lambda: kms.create_key("training-data"))
    collect(lambda: kms.create_key("bad name"))
    collect(lambda: kms.destroy_key_version("training-data", 7))
    collect(lambda: LocalKms(store, PASSPHRASE + "x"))
    old = kms.wrap_data_key("training-data", DATA_KEY, AD)
    kms.rotate_key("training-data")
    kms.destroy_key_version("training-data", 2)
    collect(lambda: kms.unwrap_data_key(old, AD))
    doc = read_doc(store)
    write_doc(store, doc | {"sealed": doc["sealed"][:-8] + "AAAAAAA="})
    collect(lambda: LocalKms(store, PASSPHRASE))
    write_doc(store, doc | {"kdf": doc["kdf"] | {"salt": base64.b64encode(bytes(16)).decode()}})
    collect(lambda: LocalKms(store, PASSPHRASE))

    assert {type(e) for e in errors} == {
        IntegrityError,
        KeyNotFound,
        ConfigError,
        AuthError,
        KeyStoreCorrupted,
    }
    assert len(errors) == 10
    for e in errors:
        text = f"{e} {e.diagnostics()} {e!r}"
        assert not [s for s in secrets if s in text]


# -- chapter 6: many processes at once -------------------------------------------------------


def _create_in_child(store: str, name: str, go: Any) -> None:
    go.wait(60)
    LocalKms(Path(store), PASSPHRASE).create_key(name)


def test_concurrent_creates_never_lose_a_key(kms: LocalKms, store: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()
    names = [f"worker-{i}" for i in range(8)]
    procs = [ctx.Process(target=_create_in_child, args=(str(store), n, go)) for n in names]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 8
    assert sorted(k.name for k in kms.list_keys()) == sorted(["training-data", *names])
    assert len({k.key_id for k in kms.list_keys()}) == 9


def test_gramine_pf_key_is_a_one_way_16_byte_key_per_version(kms: LocalKms) -> None:
    kms.create_key("models")
    first = kms.gramine_pf_key("models")
    assert len(first) == 16
    assert kms.gramine_pf_key("models") == first  # deterministic: the broker derives the same
    kms.rotate_key("models")
    assert kms.gramine_pf_key("models") != first
    assert kms.gramine_pf_key("models", version=1) == first
    material = {v.version: v.material for v in kms.export_secret_keys_for_trusted_runtime() if v.name == "models"}
    assert first not in material[1]  # not a slice of the primary key
    with pytest.raises(KeyNotFound):
        kms.gramine_pf_key("models", version=9)
