"""Shared serving fixtures: models built in this process, a local KMS, an encrypted model repository.

=========================  =========  ===============================================================
fixture                    scope      what
=========================  =========  ===============================================================
``sklearn_model_bytes``    session    ONNX bytes of a 3-class classifier: input ``input`` float32
                                      ``[-1, 4]``; outputs ``label`` int64 ``[-1]``, ``probabilities``
                                      float32 ``[-1, 3]`` (``sample_models.sklearn_classifier_onnx``)
``resnet50_model_bytes``   session    ResNet-50 v1.5, random weights, ~100 MB: input ``input`` float32
                                      NHWC ``[-1, 224, 224, 3]``; output ``probabilities`` ``[-1, 1000]``
``local_kms``              session    a ``LocalKms`` (fast scrypt) holding the key ``MODEL_KEY``
                                      (``"models"``)
``pf_wrap_key``            session    16 random bytes: a Gramine protected-files wrap key
``model_repo_dir``         function   ``<tmp>/models`` with ``sklearn/1/model.onnx.eml`` sealed by
                                      ``local_kms`` under ``"models"``; serve it with
                                      ``ModelRepository({"sklearn": model_repo_dir / "sklearn"},
                                      LocalKeys(local_kms))``
=========================  =========  ===============================================================
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from enclaveml.kms import SCRYPT_FAST_FOR_TESTS, LocalKms
from enclaveml.serving.repository import publish_eml_model
from enclaveml.serving.sample_models import resnet50_onnx, sklearn_classifier_onnx

MODEL_KEY = "models"
PASSPHRASE = "serving tests passphrase"


@pytest.fixture(scope="session")
def sklearn_model_bytes() -> bytes:
    return sklearn_classifier_onnx()


@pytest.fixture(scope="session")
def resnet50_model_bytes() -> bytes:
    return resnet50_onnx()


@pytest.fixture(scope="session")
def local_kms(tmp_path_factory: pytest.TempPathFactory) -> LocalKms:
    store = tmp_path_factory.mktemp("serving-kms") / "keystore.json"
    kms = LocalKms.init(store, PASSPHRASE, kdf=SCRYPT_FAST_FOR_TESTS, now=datetime.now(UTC))
    kms.create_key(MODEL_KEY)
    return kms


@pytest.fixture(scope="session")
def pf_wrap_key() -> bytes:
    return os.urandom(16)


@pytest.fixture
def model_repo_dir(tmp_path: Path, local_kms: LocalKms, sklearn_model_bytes: bytes) -> Path:
    models = tmp_path / "models"
    publish_eml_model(models / "sklearn", 1, sklearn_model_bytes, local_kms, MODEL_KEY)
    return models
