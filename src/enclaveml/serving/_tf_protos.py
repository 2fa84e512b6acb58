"""TensorFlow Serving's API protos, importable without TensorFlow.

The ``tensorflow-protobuf`` 2.11 package ships the generated ``*_pb2`` modules of
TensorFlow and TensorFlow Serving, so the model server speaks TF Serving's gRPC API without
the TensorFlow wheel (hundreds of MB, and a large attack surface inside the enclave). The
package has one defect: ``tensorflow/core/protobuf/error_codes.proto`` imports
``tensorflow/tsl/protobuf/error_codes.proto`` (TensorFlow moved the ``Code`` enum to TSL in
2.11), but the TSL file is not in the wheel. Importing ``get_model_status_pb2`` (and so
``model_service_pb2_grpc``) then fails with ``No module named 'tensorflow.tsl'``.

This module repairs that before importing anything else from the package: it builds the
missing file's descriptor (package ``tensorflow.error``, enum ``Code`` with TensorFlow's
numbering, which equals gRPC's status codes) with ``descriptor_pb2``, adds it to the default
descriptor pool, and registers module objects ``tensorflow.tsl``, ``tensorflow.tsl.protobuf``
and ``tensorflow.tsl.protobuf.error_codes_pb2`` in ``sys.modules``, the last one carrying
``DESCRIPTOR``, ``Code`` and the enum values as a generated module would. Hand-written
because no published wheel carries the file without also bringing TensorFlow.

A second gap has no such small repair: ``model_service_pb2_grpc`` imports
``model_management_pb2``, which needs ``tensorflow_serving/config/model_server_config.proto``
and its imports (none shipped). Only ``ModelService.GetModelStatus`` is served, and its
messages live in ``get_model_status_pb2``, so ``tfserving_grpc.py`` registers that one method
by its full name instead of importing the generated service module (the wire is identical).

Everything else imports the TF Serving modules from here, never from ``tensorflow_serving``
directly, so the repair always runs first.
"""

from __future__ import annotations

import sys
import types

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.internal import builder

__all__ = [
    "error_codes_pb2",
    "get_model_metadata_pb2",
    "get_model_status_pb2",
    "model_pb2",
    "predict_pb2",
    "prediction_service_pb2_grpc",
    "tensor_pb2",
    "tensor_shape_pb2",
    "types_pb2",
]

_TSL_ERROR_CODES = "tensorflow/tsl/protobuf/error_codes.proto"
_TSL_MODULE = "tensorflow.tsl.protobuf.error_codes_pb2"

# tensorflow/tsl/protobuf/error_codes.proto (TensorFlow 2.11): the values of gRPC's status codes.
_CODES = (
    ("OK", 0),
    ("CANCELLED", 1),
    ("UNKNOWN", 2),
    ("INVALID_ARGUMENT", 3),
    ("DEADLINE_EXCEEDED", 4),
    ("NOT_FOUND", 5),
    ("ALREADY_EXISTS", 6),
    ("PERMISSION_DENIED", 7),
    ("UNAUTHENTICATED", 16),
    ("RESOURCE_EXHAUSTED", 8),
    ("FAILED_PRECONDITION", 9),
    ("ABORTED", 10),
    ("OUT_OF_RANGE", 11),
    ("UNIMPLEMENTED", 12),
    ("INTERNAL", 13),
    ("UNAVAILABLE", 14),
    ("DATA_LOSS", 15),
    ("DO_NOT_USE_RESERVED_FOR_FUTURE_EXPANSION_USE_DEFAULT_IN_SWITCH_INSTEAD_", 20),
)


def _install_tsl_error_codes() -> None:
    """Add the missing TSL ``error_codes.proto`` to the default pool and to ``sys.modules``."""
    if _TSL_MODULE in sys.modules:
        return
    pool = descriptor_pool.Default()
    try:
        file_descriptor = pool.FindFileByName(_TSL_ERROR_CODES)
    except KeyError:
        proto = descriptor_pb2.FileDescriptorProto(name=_TSL_ERROR_CODES, package="tensorflow.error", syntax="proto3")
        proto.options.java_package = "org.tensorflow.framework"
        proto.options.go_package = "github.com/google/tsl/tsl/go/protobuf/for_core_protos_go_proto"
        code = proto.enum_type.add(name="Code")
        for name, number in _CODES:
            code.value.add(name=name, number=number)
        file_descriptor = pool.AddSerializedFile(proto.SerializeToString())
        if not hasattr(file_descriptor, "enum_types_by_name"):  # the pure-Python pool returns None
            file_descriptor = pool.FindFileByName(_TSL_ERROR_CODES)
    module = types.ModuleType(_TSL_MODULE, "Generated from a FileDescriptorProto by enclaveml.serving._tf_protos.")
    namespace = module.__dict__
    namespace["DESCRIPTOR"] = file_descriptor
    builder.BuildMessageAndEnumDescriptors(file_descriptor, namespace)
    builder.BuildTopDescriptorsAndMessages(file_descriptor, _TSL_MODULE, namespace)
    import tensorflow  # the package from tensorflow-protobuf, not TensorFlow

    tsl = sys.modules.setdefault("tensorflow.tsl", types.ModuleType("tensorflow.tsl"))
    tsl_protobuf = sys.modules.setdefault("tensorflow.tsl.protobuf", types.ModuleType("tensorflow.tsl.protobuf"))
    tsl.__path__ = []  # a package, so the import system accepts submodules from sys.modules
    tsl_protobuf.__path__ = []
    sys.modules[_TSL_MODULE] = module
    tensorflow.tsl = tsl
    tsl.protobuf = tsl_protobuf  # type: ignore[attr-defined]
    tsl_protobuf.error_codes_pb2 = module  # type: ignore[attr-defined]


_install_tsl_error_codes()

# The repair above must run before these imports.
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2  # noqa: E402
from tensorflow.core.protobuf import error_codes_pb2  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
)
