"""The model repository: encrypted model files in TF Serving's layout, versions, hot reload, readiness.

Layout (TF Serving's)::

    models/resnet50/            the model root, configured as {"resnet50": Path("models/resnet50")}
        1/model.onnx.eml        one encrypted model file per numbered version directory
        2/model.onnx.pf

A version directory holds exactly one model file (hidden files, such as a temporary file
being written, are ignored):

- ``*.eml`` (normally ``model.onnx.eml``, or ``model.savedmodel.eml`` for a TensorFlow
  SavedModel): an EML model file, opened with the key source's ``KeyWrapper`` by
  ``analytics.ml.load_encrypted_model`` (authenticated, then checked as ONNX when its header
  says ``format=onnx``). Its authenticated header names the model and version; both must
  match the directory, so a sealed version 1 copied into ``3/`` (a rollback in disguise) or
  another model's file is refused;
- ``*.pf`` or any file starting with ``GRAFS_PF``: a Gramine protected file, opened with the
  key source's 16-byte wrap key by ``crypto.gramine_pf.decrypt_pf``. A protected file is
  bound to a path: ``<model root as configured>/<version>/<file name>``, normalised as
  Gramine does (``./models//m`` → ``models/m``), e.g. ``models/resnet50/2/model.onnx.pf``.
  ``pf_path_prefix={"resnet50": "models/resnet50-v15-fp32"}`` replaces the root in that path
  for files encrypted for another layout (a Gramine manifest's ``uri``).

The runtime follows the model's format: ``format=onnx`` (and a protected file holding ONNX)
→ ``runtime_factory`` (``OnnxModel``); ``format=tf-savedmodel`` (and a protected file holding
a tar archive) → ``savedmodel_factory`` (``runtime_tf.TfSavedModel``, imported only then;
without TensorFlow the version fails with ``runtime_tf.TF_MISSING`` as its reason).
Plaintext model bytes exist only in memory (``OnnxModel`` builds its session from them,
``TfSavedModel`` loads from TensorFlow's in-memory file system).

Version policy: TF Serving's default, ``latest``: serve the newest version directory. A new
version is loaded beside the current one, which keeps serving until the new one is
AVAILABLE; then the older one is unloaded (UNLOADING → END). A version that fails to load
(tampered, wrong key, not ONNX, wrong name or version) ends in END with ``error``: one line
saying why; the previous version, if any, keeps serving. A failed version is tried again
only when its file changes, or, for key service and configuration errors, on every reload.
A version directory that disappears is unloaded. A model with no AVAILABLE version makes
``ready()`` false, and ``not_ready_reasons()`` says why.

``poll_seconds``: a daemon thread calls ``reload()`` that often (hot reload: publish a new
version by writing its directory elsewhere and renaming it into place, as
``publish_eml_model`` does). Every method is thread-safe; loading happens outside the lock,
so ``get()`` never waits for a load.
"""

from __future__ import annotations

import enum
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from enclaveml.crypto import KeyWrapper
from enclaveml.errors import ConfigError, EnclaveMLError, FormatError, IntegrityError
from enclaveml.serving.errors import ModelNotFound, ModelNotReady
from enclaveml.serving.keys import KeySource
from enclaveml.serving.runtime import ModelRuntime, OnnxModel

__all__ = [
    "ModelFormat",
    "ModelRepository",
    "ModelState",
    "ServedModel",
    "SourceFormat",
    "VersionStatus",
    "pf_bound_path",
    "publish_eml_model",
    "publish_pf_model",
    "publish_savedmodel",
]

logger = logging.getLogger("enclaveml.serving")

SourceFormat = Literal["eml", "gramine-pf"]
ModelFormat = Literal["onnx", "tf-savedmodel"]
_PF_FILE_ID = b"GRAFS_PF"


class ModelState(enum.Enum):
    """TF Serving's ``ModelVersionStatus.State`` names."""

    START = 10
    LOADING = 20
    AVAILABLE = 30
    UNLOADING = 40
    END = 50


@dataclass(frozen=True)
class VersionStatus:
    version: int
    state: ModelState
    error: str | None = None  # one line: why this version is not loaded


@dataclass(frozen=True)
class ServedModel:
    """A loaded model version. ``decrypt_seconds``: read + verify + decrypt; ``load_seconds``: runtime build.

    ``source_format``: the sealed file's format; ``model_format``: the model inside it.
    """

    name: str
    version: int
    runtime: ModelRuntime
    load_seconds: float
    source_format: SourceFormat
    decrypt_seconds: float = 0.0
    path: Path | None = None
    model_format: ModelFormat = "onnx"


@dataclass(frozen=True)
class _Fingerprint:
    name: str
    size: int
    mtime_ns: int


@dataclass
class _Version:
    state: ModelState
    error: str | None = None
    served: ServedModel | None = None
    fingerprint: _Fingerprint | None = None
    retry: bool = False


class _LoadFailed(Exception):
    def __init__(self, line: str, retry: bool) -> None:
        super().__init__(line)
        self.line, self.retry = line, retry


RuntimeFactory = Callable[[bytes], ModelRuntime]


def _savedmodel_runtime(archive: bytes) -> ModelRuntime:
    from enclaveml.serving.runtime_tf import TfSavedModel  # TensorFlow only when a SavedModel is served

    return TfSavedModel(archive)


def pf_bound_path(root: str | os.PathLike[str], version: int, file_name: str) -> str:
    """The path a protected model file is bound to: ``<root>/<version>/<file>``, normalised as Gramine does."""
    from enclaveml.crypto.gramine_pf import gramine_path

    return gramine_path(f"{os.fspath(root)}/{version}/{file_name}")


class ModelRepository:
    """Models served from their roots, opened with ``keys``; see the module docstring.

    ``models``: model name → model root (its numbered version directories). ``keys``: where
    the keys come from (``serving.keys``). ``poll_seconds``: reload period (``None``: only
    explicit ``reload()`` calls). ``pf_path_prefix``: model name → the root to bind
    protected files to instead of the configured one. ``runtime_factory``: ONNX model bytes →
    ``ModelRuntime`` (default ``OnnxModel``); ``savedmodel_factory``: SavedModel archive →
    ``ModelRuntime`` (default ``runtime_tf.TfSavedModel``).
    """

    def __init__(
        self,
        models: Mapping[str, Path],
        keys: KeySource,
        *,
        poll_seconds: float | None = None,
        pf_path_prefix: Mapping[str, str] | None = None,
        runtime_factory: RuntimeFactory = OnnxModel,
        savedmodel_factory: RuntimeFactory = _savedmodel_runtime,
    ) -> None:
        if not models:
            raise ConfigError("no models to serve", "name at least one model and its directory")
        if poll_seconds is not None and poll_seconds <= 0:
            raise ConfigError("the poll interval must be positive", "pass poll_seconds > 0, or None")
        unknown = set(pf_path_prefix or {}) - set(models)
        if unknown:
            raise ConfigError(f"pf_path_prefix names unknown model {sorted(unknown)[0]!r}")
        self._roots = {name: Path(root) for name, root in models.items()}
        self._keys = keys
        self._poll_seconds = poll_seconds
        self._pf_prefix = dict(pf_path_prefix or {})
        self._runtime_factories: dict[ModelFormat, RuntimeFactory] = {
            "onnx": runtime_factory,
            "tf-savedmodel": savedmodel_factory,
        }
        self._versions: dict[str, dict[int, _Version]] = {name: {} for name in models}
        self._scan_errors: dict[str, str | None] = dict.fromkeys(models)
        self._lock = threading.RLock()
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # -- queries --------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self._roots)

    def get(self, name: str, version: int | None = None) -> ServedModel:
        """The newest AVAILABLE version of ``name``, or ``version`` exactly.

        ``ModelNotFound``: no such model, or that version is not AVAILABLE; ``ModelNotReady``:
        the model has no AVAILABLE version (the message says why).
        """
        with self._lock:
            versions = self._known(name)
            available = {v: entry.served for v, entry in versions.items() if entry.served is not None}
            if version is not None:
                served = available.get(version)
                if served is None:
                    loaded = ", ".join(str(v) for v in sorted(available)) or "none"
                    raise ModelNotFound(f"model {name!r} has no available version {version} (available: {loaded})")
                return served
            if not available:
                raise ModelNotReady(f"model {name!r} is not ready: {self._reason(name)}")
            return available[max(available)]

    def status(self, name: str) -> list[VersionStatus]:
        """Every version of ``name`` this repository has seen, oldest first (``ModelNotFound`` if unknown)."""
        with self._lock:
            versions = self._known(name)
            return [VersionStatus(v, entry.state, entry.error) for v, entry in sorted(versions.items())]

    def ready(self) -> bool:
        """Whether every model has an AVAILABLE version."""
        return not self.not_ready_reasons()

    def not_ready_reasons(self) -> dict[str, str]:
        """Model name → why it has no AVAILABLE version, for the models that have none."""
        with self._lock:
            return {
                name: self._reason(name)
                for name, versions in self._versions.items()
                if not any(entry.served is not None for entry in versions.values())
            }

    def _known(self, name: str) -> dict[int, _Version]:
        versions = self._versions.get(name)
        if versions is None:
            served = ", ".join(self.names())
            raise ModelNotFound(f"no model named {name!r}", f"served models: {served}")
        return versions

    def _reason(self, name: str) -> str:
        scan_error = self._scan_errors[name]
        if scan_error is not None:
            return scan_error
        versions = self._versions[name]
        if not versions:
            return "not loaded yet"
        newest = max(versions)
        entry = versions[newest]
        if entry.error is not None:
            return f"version {newest}: {entry.error}"
        return f"version {newest} is {entry.state.name}"

    # -- loading --------------------------------------------------------------------------

    def load_all(self) -> None:
        """Load the newest version of every model (errors are recorded, not raised); start polling if asked."""
        self.reload()
        if self._poll_seconds is not None and self._poller is None:
            self._poller = threading.Thread(target=self._poll, name="model-repository-poll", daemon=True)
            self._poller.start()

    def reload(self) -> None:
        """Rescan every model root: load a newer version, unload removed and superseded ones."""
        with self._reload_lock:
            for name in self._roots:
                self._reload_model(name)

    def _poll(self) -> None:
        assert self._poll_seconds is not None
        while not self._stop.wait(self._poll_seconds):
            try:
                self.reload()
            except Exception:  # keep polling: the next scan may succeed; the log has this one
                logger.exception("model repository reload failed")

    def close(self) -> None:
        """Stop polling and unload every model."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=10)
        with self._reload_lock, self._lock:
            for versions in self._versions.values():
                for entry in versions.values():
                    if entry.served is not None:
                        entry.served, entry.state = None, ModelState.END

    def __enter__(self) -> ModelRepository:
        self.load_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _reload_model(self, name: str) -> None:
        root = self._roots[name]
        on_disk, scan_error = _scan(root)
        with self._lock:
            self._scan_errors[name] = scan_error
            versions = self._versions[name]
            for version, entry in versions.items():  # removed directories: unload
                if version not in on_disk and entry.state is not ModelState.END:
                    self._unload(name, version, entry)
        if not on_disk:
            return
        newest = max(on_disk)
        dir_path = on_disk[newest]
        with self._lock:
            known = versions.get(newest)
            needs_load = known is None or (
                known.served is None
                and known.state is not ModelState.LOADING
                # unloaded cleanly (a newer version went away), retryable, or its file changed
                and (known.error is None or known.retry or known.fingerprint != _fingerprint_of(dir_path))
            )
            if needs_load:
                versions[newest] = _Version(ModelState.LOADING)
        if needs_load:
            self._load_into(name, newest, dir_path)
        with self._lock:
            if versions[newest].served is not None:  # the newest serves: unload the ones it supersedes
                for version, older in versions.items():
                    if version != newest and older.served is not None:
                        self._unload(name, version, older)

    def _unload(self, name: str, version: int, entry: _Version) -> None:
        entry.state = ModelState.UNLOADING
        entry.served = None  # requests already holding the ServedModel finish with it
        entry.state = ModelState.END
        logger.info("model %s version %d unloaded", name, version)

    def _load_into(self, name: str, version: int, dir_path: Path) -> None:
        fingerprint = _fingerprint_of(dir_path)
        try:
            served = self._load(name, version, dir_path)
        except Exception as exc:  # anything but _LoadFailed is a bug; it must not leave the version LOADING
            failed = exc if isinstance(exc, _LoadFailed) else _LoadFailed(f"unexpected {type(exc).__name__}", True)
            if failed is not exc:
                logger.exception("model %s version %d: unexpected error while loading", name, version)
            logger.warning("model %s version %d not loaded: %s", name, version, failed.line)
            with self._lock:
                self._versions[name][version] = _Version(ModelState.END, failed.line, None, fingerprint, failed.retry)
            return
        with self._lock:
            self._versions[name][version] = _Version(ModelState.AVAILABLE, served=served, fingerprint=fingerprint)
        timing = f"decrypt {served.decrypt_seconds:.3f} s, load {served.load_seconds:.3f} s"
        kind = f"{served.model_format} in {served.source_format}"
        logger.info("model %s version %d available (%s, %s)", name, version, kind, timing)

    def _load(self, name: str, version: int, dir_path: Path) -> ServedModel:
        file_path, source_format = _model_file(dir_path)
        started = time.perf_counter()
        try:
            if source_format == "eml":
                plaintext, model_format = _open_eml(file_path, self._keys.key_wrapper_for_eml(), name, version)
            else:
                root = self._pf_prefix.get(name, os.fspath(self._roots[name]))
                bound = pf_bound_path(root, version, file_path.name)
                plaintext, model_format = _open_pf(file_path, self._keys.pf_wrap_key(), bound)
        except EnclaveMLError as exc:
            # Tampering and malformed files stay failed until the file changes; key service,
            # attestation and configuration problems may clear up: try again on each reload.
            raise _LoadFailed(_line(exc), retry=not isinstance(exc, IntegrityError)) from None
        except OSError as exc:
            raise _LoadFailed(f"{file_path.name}: cannot read: {exc.strerror or exc}", retry=True) from None
        decrypted = time.perf_counter()
        try:
            runtime = self._runtime_factories[model_format](plaintext)
        except EnclaveMLError as exc:
            raise _LoadFailed(f"{file_path.name}: {_line(exc)}", retry=False) from None
        except Exception as exc:  # a runtime factory's own failure: one line, no traceback in the status
            raise _LoadFailed(f"{file_path.name}: the runtime cannot load it: {exc}", retry=False) from None
        finally:
            del plaintext
        loaded = time.perf_counter()
        return ServedModel(
            name, version, runtime, loaded - decrypted, source_format, decrypted - started, file_path, model_format
        )


def _line(exc: EnclaveMLError) -> str:
    return " ".join(exc.diagnostics().split())


# -- scanning -------------------------------------------------------------------------------


def _scan(root: Path) -> tuple[dict[int, Path], str | None]:
    """Version number → directory, and why there is none (or ``None``)."""
    try:
        children = list(root.iterdir())
    except FileNotFoundError:
        return {}, f"{root}: no such directory"
    except OSError as exc:
        return {}, f"{root}: cannot list: {exc.strerror or exc}"
    found = {int(p.name): p for p in children if p.name.isdigit() and int(p.name) > 0 and p.is_dir()}
    if not found:
        return {}, f"{root}: no version directories (1/, 2/, ...)"
    return found, None


def _candidates(dir_path: Path) -> list[Path]:
    return sorted(p for p in dir_path.iterdir() if not p.name.startswith(".") and p.is_file())


def _is_pf_file(path: Path) -> bool:
    if path.name.endswith(".pf"):
        return True
    try:
        with path.open("rb") as handle:
            return handle.read(len(_PF_FILE_ID)) == _PF_FILE_ID
    except OSError:
        return False


def _model_file(dir_path: Path) -> tuple[Path, SourceFormat]:
    try:
        files = _candidates(dir_path)
    except OSError as exc:
        raise _LoadFailed(f"{dir_path}: cannot list: {exc.strerror or exc}", retry=True) from None
    models: list[tuple[Path, SourceFormat]] = []
    for path in files:
        if path.name.endswith(".eml"):
            models.append((path, "eml"))
        elif _is_pf_file(path):
            models.append((path, "gramine-pf"))
    if len(models) == 1:
        return models[0]
    if models:
        listed = ", ".join(p.name for p, _ in models)
        raise _LoadFailed(f"{dir_path}: {len(models)} model files ({listed}); a version holds exactly one", False)
    plain = ", ".join(p.name for p in files)
    found = f" (found {plain}: plaintext models are never served)" if plain else ""
    raise _LoadFailed(f"{dir_path}: no encrypted model file (model.onnx.eml or model.onnx.pf){found}", False)


def _fingerprint_of(dir_path: Path) -> _Fingerprint | None:
    try:
        files = _candidates(dir_path)
        if len(files) != 1:
            return _Fingerprint(",".join(p.name for p in files), len(files), 0)
        stat = files[0].stat()
    except OSError:
        return None
    return _Fingerprint(files[0].name, stat.st_size, stat.st_mtime_ns)


# -- opening ----------------------------------------------------------------------------------


def _open_eml(path: Path, kms: KeyWrapper, name: str, version: int) -> tuple[bytes, ModelFormat]:
    from enclaveml.analytics.ml import MODEL_FORMATS, load_encrypted_model, read_model_metadata

    claimed = read_model_metadata(path)  # unauthenticated until load_encrypted_model compares it
    plaintext = load_encrypted_model(path, kms, expected=claimed, formats=MODEL_FORMATS)
    if claimed.version != version or claimed.name != name:
        raise IntegrityError(
            f"{path.name}: the file is sealed as model {claimed.name!r} version {claimed.version}, "
            f"but it is in {name!r} version {version}",
            "a copied or renamed model file is refused; seal the model for this name and version",
        )
    return plaintext, "tf-savedmodel" if claimed.format == "tf-savedmodel" else "onnx"


def _open_pf(path: Path, key: bytes, bound_path: str) -> tuple[bytes, ModelFormat]:
    """A protected file's plaintext and what it holds: a tar archive is a SavedModel, anything else must be ONNX."""
    from enclaveml.crypto.gramine_pf import decrypt_pf
    from enclaveml.serving.runtime_tf import is_savedmodel_archive

    data = path.read_bytes()
    try:
        plaintext = decrypt_pf(data, key, bound_path)
        if is_savedmodel_archive(plaintext):
            return plaintext, "tf-savedmodel"  # TfSavedModel checks the archive
        _check_onnx(plaintext)
    except EnclaveMLError as exc:
        raise exc.about(path.name) from None
    return plaintext, "onnx"


def _check_onnx(data: bytes) -> None:
    import onnx

    try:
        onnx.checker.check_model(data)
    except Exception:  # protobuf's DecodeError and onnx's ValidationError share no base
        raise FormatError("the decrypted file is not a valid ONNX model") from None


# -- publishing (the owner's side) ------------------------------------------------------------


def _publish(model_root: Path, version: int, file_name: str, sealed: bytes | bytearray) -> Path:
    """Write ``<root>/<version>/<file>`` as a whole: a hidden directory renamed into place."""
    if version < 1:
        raise ConfigError(f"invalid model version {version}", "versions start at 1")
    model_root.mkdir(parents=True, exist_ok=True)
    target = model_root / str(version)
    if target.exists():
        raise ConfigError(f"{target} already exists", "publish a new version number; versions are never replaced")
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=model_root))
    try:
        fd = os.open(staging / file_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(sealed)
        staging.chmod(0o755)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target / file_name


def publish_eml_model(
    model_root: str | os.PathLike[str],
    version: int,
    onnx_bytes: bytes,
    kms: KeyWrapper,
    key: str,
    *,
    name: str | None = None,
) -> Path:
    """Seal ``onnx_bytes`` as ``<model_root>/<version>/model.onnx.eml``, published atomically; returns its path.

    ``name`` (default: the root's directory name) and ``version`` go into the authenticated
    header, where the repository checks them.
    """
    from enclaveml.analytics.ml import ModelMetadata
    from enclaveml.crypto import encrypt_bytes

    root = Path(model_root)
    metadata = ModelMetadata.from_onnx(onnx_bytes, name=name or root.name, version=version)
    sealed = encrypt_bytes(onnx_bytes, kms, key, context=metadata.to_context())
    return _publish(root, version, "model.onnx.eml", sealed)


def publish_pf_model(
    model_root: str | os.PathLike[str],
    version: int,
    onnx_bytes: bytes,
    wrap_key: bytes,
    *,
    bound_root: str | None = None,
) -> Path:
    """Encrypt ``onnx_bytes`` as a Gramine protected file ``<model_root>/<version>/model.onnx.pf``; returns its path.

    It is bound to ``pf_bound_path(bound_root or model_root, version, "model.onnx.pf")``:
    what the repository checks (pass the same ``bound_root`` as its ``pf_path_prefix``).
    """
    from enclaveml.crypto.gramine_pf import encrypt_pf

    root = Path(model_root)
    bound = pf_bound_path(bound_root if bound_root is not None else model_root, version, "model.onnx.pf")
    return _publish(root, version, "model.onnx.pf", bytes(encrypt_pf(onnx_bytes, wrap_key, bound)))


def publish_savedmodel(
    model_root: str | os.PathLike[str],
    version: int,
    directory: str | os.PathLike[str],
    kms: KeyWrapper,
    key: str,
    *,
    name: str | None = None,
) -> Path:
    """Seal the SavedModel ``directory`` as ``<model_root>/<version>/model.savedmodel.eml``, published atomically.

    Packed and sealed in memory by ``runtime_tf.seal_savedmodel`` (no TensorFlow needed);
    ``name`` (default: the root's directory name) and ``version`` go into the header.
    """
    from enclaveml.serving.runtime_tf import seal_savedmodel

    root = Path(model_root)
    sealed, _ = seal_savedmodel(directory, kms, key, name=name or root.name, version=version)
    return _publish(root, version, "model.savedmodel.eml", sealed)
