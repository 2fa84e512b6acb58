"""Models for tests, demos and benchmarks, built in this process: nothing is downloaded.

``sklearn_classifier_onnx`` is a small logistic regression trained on seeded synthetic data
and converted with skl2onnx: one float input ``input`` ``[-1, n_features]``, outputs ``label``
(int64 ``[-1]``) and ``probabilities`` (float ``[-1, 3]``), plain tensors (no ZipMap).

``resnet50_onnx`` is the ResNet-50 v1.5 topology that the CCZoo TF Serving example serves
(``resnet50-v15-fp32``), with seeded random weights instead of trained ones: what a benchmark
needs is the real amount of work and data (25.6 M parameters, ~100 MB, ~4 GFLOP per image),
not the accuracy. Layers, as ``torchvision.models.resnet50`` has them, with each batch norm
folded into its convolution's bias (as inference graphs do)::

    input NHWC float32 [batch, 224, 224, 3]      (what the CCZoo client sends)
    Transpose → NCHW
    conv 7×7/2, 64 → ReLU → max pool 3×3/2
    4 stages of bottleneck blocks: 3, 4, 6, 3 blocks; widths 64, 128, 256, 512; ×4 expansion
      block: conv 1×1 → ReLU → conv 3×3 (stride 2 in a stage's first block: v1.5) → ReLU
             → conv 1×1, plus the shortcut (a 1×1 projection, with the stride, in the first
             block of a stage), → ReLU
    global average pool → flatten → fully connected 2048 → 1000 → softmax → probabilities [batch, 1000]

Weights are ``rng.standard_normal(dtype=float32)`` scaled by He's ``sqrt(2 / fan_in)``; the
last convolution of each residual branch is scaled down further (as "zero-gamma"
initialisation does), so activations stay finite through 16 blocks without batch norm. The
graph is assembled with ``onnx.helper`` and validated with ``onnx.checker``. Built bytes are
cached per process (building takes about a second).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["RESNET50_CLASSES", "RESNET50_INPUT", "resnet50_onnx", "sklearn_classifier_onnx"]

RESNET50_INPUT = (224, 224, 3)
RESNET50_CLASSES = 1000
_OPSET = 17
# (blocks, width) per stage; the output channels are 4 × width.
_STAGES = ((3, 64), (4, 128), (6, 256), (3, 512))
_EXPANSION = 4
_RESIDUAL_SCALE = 0.2


@functools.cache
def sklearn_classifier_onnx(n_features: int = 4, seed: int = 0) -> bytes:
    """A 3-class logistic regression over ``n_features`` floats, as ONNX bytes (reproducible per seed)."""
    from skl2onnx import convert_sklearn  # type: ignore[import-untyped]
    from skl2onnx.common.data_types import FloatTensorType  # type: ignore[import-untyped]
    from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]

    if n_features < 1:
        raise ValueError("n_features must be at least 1")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((300, n_features), dtype=np.float32)
    direction = rng.standard_normal(n_features, dtype=np.float32)
    score = x @ direction
    y = np.digitize(score, np.quantile(score, [1 / 3, 2 / 3])).astype(np.int64)  # three balanced classes
    model = LogisticRegression(max_iter=500, random_state=seed).fit(x, y)
    onnx_model = convert_sklearn(
        model,
        name="sklearn_classifier",
        initial_types=[("input", FloatTensorType([None, n_features]))],
        target_opset={"": _OPSET, "ai.onnx.ml": 3},
        options={id(model): {"zipmap": False}},
    )
    opsets = sorted((o.domain, o.version) for o in onnx_model.opset_import)  # set order otherwise: not reproducible
    del onnx_model.opset_import[:]
    for domain, version in opsets:
        onnx_model.opset_import.add(domain=domain, version=version)
    return bytes(onnx_model.SerializeToString(deterministic=True))


class _GraphBuilder:
    """Collects nodes and initializers with generated names."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0

    def _name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def _weight(self, name: str, array: npt.NDArray[np.float32]) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], prefix: str, **attributes: Any) -> str:
        from onnx import helper

        output = self._name(prefix)
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def conv(self, x: str, c_in: int, c_out: int, kernel: int, stride: int, *, scale: float = 1.0) -> str:
        fan_in = c_in * kernel * kernel
        w = self.rng.standard_normal((c_out, c_in, kernel, kernel), dtype=np.float32)
        w *= np.float32(np.sqrt(2.0 / fan_in) * scale)
        b = self.rng.standard_normal(c_out, dtype=np.float32) * np.float32(0.01)
        name = self._name("conv")
        pad = kernel // 2
        return self.node(
            "Conv",
            [x, self._weight(f"{name}_w", w), self._weight(f"{name}_b", b)],
            "conv",
            kernel_shape=[kernel, kernel],
            strides=[stride, stride],
            pads=[pad, pad, pad, pad],
        )

    def relu(self, x: str) -> str:
        return self.node("Relu", [x], "relu")

    def bottleneck(self, x: str, c_in: int, width: int, stride: int) -> str:
        c_out = width * _EXPANSION
        y = self.relu(self.conv(x, c_in, width, 1, 1))
        y = self.relu(self.conv(y, width, width, 3, stride))  # v1.5: the stride is on the 3×3
        y = self.conv(y, width, c_out, 1, 1, scale=_RESIDUAL_SCALE)
        shortcut = x if stride == 1 and c_in == c_out else self.conv(x, c_in, c_out, 1, stride)
        return self.relu(self.node("Add", [y, shortcut], "add"))

    def dense(self, x: str, n_in: int, n_out: int) -> str:
        w = self.rng.standard_normal((n_out, n_in), dtype=np.float32) * np.float32(np.sqrt(1.0 / n_in))
        b = np.zeros(n_out, dtype=np.float32)
        return self.node("Gemm", [x, self._weight("fc_w", w), self._weight("fc_b", b)], "fc", transB=1)


@functools.cache
def resnet50_onnx(seed: int = 0, *, batch_dim: bool = True) -> bytes:
    """ResNet-50 v1.5 with random weights as ONNX bytes (see the module docstring); ~100 MB, cached.

    ``batch_dim``: the batch dimension is free (``batch``, any size); ``False`` fixes it at 1.
    """
    import onnx
    from onnx import TensorProto, helper

    g = _GraphBuilder(seed)
    x = g.node("Transpose", ["input"], "nchw", perm=[0, 3, 1, 2])
    x = g.relu(g.conv(x, 3, 64, 7, 2))
    x = g.node("MaxPool", [x], "pool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    channels = 64
    for stage, (blocks, width) in enumerate(_STAGES):
        for block in range(blocks):
            stride = 2 if block == 0 and stage > 0 else 1
            x = g.bottleneck(x, channels, width, stride)
            channels = width * _EXPANSION
    x = g.node("GlobalAveragePool", [x], "gap")
    x = g.node("Flatten", [x], "flatten", axis=1)
    logits = g.dense(x, channels, RESNET50_CLASSES)
    g.nodes.append(helper.make_node("Softmax", [logits], ["probabilities"], name="softmax", axis=1))
    batch: str | int = "batch" if batch_dim else 1
    graph = helper.make_graph(
        g.nodes,
        "resnet50_v15",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, *RESNET50_INPUT])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [batch, RESNET50_CLASSES])],
        g.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)], producer_name="enclaveml")
    model.ir_version = 8  # what onnxruntime >= 1.14 reads; helper's default follows the installed onnx
    data = bytes(model.SerializeToString())
    onnx.checker.check_model(data)  # from the bytes: checking the ModelProto would serialise 100 MB again
    return data
