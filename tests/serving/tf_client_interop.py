"""The unchanged TF Serving client against an enclaveml server; run in the TensorFlow venv (.venv/tfclient).

Usage: ``python tf_client_interop.py SPEC.json`` where SPEC is::

    {"plain": "127.0.0.1:PORT", "tls": "127.0.0.1:PORT", "ca": "ca.crt", "model": "sklearn",
     "input": "input", "rows": [[...], ...]}

It uses the client code path TF Serving's own examples use (``PredictionServiceStub``,
``ModelServiceStub``, ``tf.make_tensor_proto``, ``tf.make_ndarray``) and prints one JSON
object with what came back: Predict outputs (a ``tensor_content`` request and a broadcast
``float_val`` request), the signature from GetModelMetadata, the version states from
GetModelStatus, the status codes of refused requests, and a Predict over one-way TLS.
TensorFlow takes seconds to import, so every call happens in this one run.
"""

from __future__ import annotations

import json
import sys

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)


def predict(stub, model, inputs, *, version=None, signature="serving_default"):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    for name, proto in inputs.items():
        request.inputs[name].CopyFrom(proto)
    response = stub.Predict(request, timeout=30)
    outputs = {name: tf.make_ndarray(proto).tolist() for name, proto in response.outputs.items()}
    return {"version": response.model_spec.version.value, "outputs": outputs}


def code_of(call):
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code().name
    return "OK"


def main(spec_path):
    with open(spec_path) as handle:
        spec = json.load(handle)
    model, input_name = spec["model"], spec["input"]
    rows = np.asarray(spec["rows"], dtype=np.float32)
    result = {}

    channel = grpc.insecure_channel(spec["plain"])
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    result["predict"] = predict(stub, model, {input_name: tf.make_tensor_proto(rows)})
    result["predict_v1"] = predict(stub, model, {input_name: tf.make_tensor_proto(rows)}, version=1)
    # A scalar broadcast to a shape travels as one float_val: the server repeats it.
    broadcast = tf.make_tensor_proto(0.5, dtype=tf.float32, shape=[2, rows.shape[1]])
    result["broadcast_float_val"] = list(broadcast.float_val)
    result["predict_broadcast"] = predict(stub, model, {input_name: broadcast})

    metadata_request = get_model_metadata_pb2.GetModelMetadataRequest()
    metadata_request.model_spec.name = model
    metadata_request.metadata_field.append("signature_def")
    metadata = stub.GetModelMetadata(metadata_request, timeout=30)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    metadata.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    result["signature"] = {
        "method_name": signature.method_name,
        "inputs": {
            n: [tf.dtypes.as_dtype(t.dtype).name, [d.size for d in t.tensor_shape.dim]]
            for n, t in signature.inputs.items()
        },
        "outputs": {
            n: [tf.dtypes.as_dtype(t.dtype).name, [d.size for d in t.tensor_shape.dim]]
            for n, t in signature.outputs.items()
        },
    }

    status_stub = model_service_pb2_grpc.ModelServiceStub(channel)
    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = model
    status = status_stub.GetModelStatus(status_request, timeout=30)
    result["status"] = [
        [s.version, get_model_status_pb2.ModelVersionStatus.State.Name(s.state), s.status.error_code]
        for s in status.model_version_status
    ]

    doubles = tf.make_tensor_proto(rows.astype(np.float64))
    result["errors"] = {
        "unknown_model": code_of(lambda: predict(stub, "no-such-model", {input_name: tf.make_tensor_proto(rows)})),
        "wrong_dtype": code_of(lambda: predict(stub, model, {input_name: doubles})),
        "wrong_signature": code_of(
            lambda: predict(stub, model, {input_name: tf.make_tensor_proto(rows)}, signature="classify")
        ),
        "unknown_version": code_of(lambda: predict(stub, model, {input_name: tf.make_tensor_proto(rows)}, version=9)),
    }
    channel.close()

    with open(spec["ca"], "rb") as handle:
        credentials = grpc.ssl_channel_credentials(root_certificates=handle.read())
    with grpc.secure_channel(spec["tls"], credentials) as secure:
        tls_stub = prediction_service_pb2_grpc.PredictionServiceStub(secure)
        result["predict_tls"] = predict(tls_stub, model, {input_name: tf.make_tensor_proto(rows)})

    result["tensorflow"] = tf.__version__
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
