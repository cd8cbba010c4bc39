"""Write a `SparseNetwork` as a standard ONNX model that ONNX Runtime (or any ONNX runner) can execute.

ONNX Runtime has no standard sparse Gemm or Conv kernel, so every CSR weight is written
as a dense float32 initializer: dead units removed by `export` stay removed (the model is
smaller than the dense original), pruned connections become stored zeros. Linear layers
become ``Gemm`` (weight ``[out, in]``, ``transB=1``), convolutions ``Conv`` (weight
``[out, in, kh, kw]``), residual blocks their body and shortcut joined by ``Add``; an
option-A shortcut is a strided ``Slice`` and a channel ``Pad``. When the network records
its input preprocessing, the model takes raw pixels and standardizes them first.

The `onnx` package is imported only here and only when a model is built, so sclref runs
without it; `OnnxUnavailable` says which extra to install.
"""

from __future__ import annotations

import json

import numpy as np

from sclref._version import __version__
from sclref.errors import InputError, LimitError, check_allocation
from sclref.sparse import network as net
from sclref.sparse.format import FormatError, check_range
from sclref.storage import atomic_write_bytes

__all__ = ["INSTALL_HINT", "IR_VERSION", "OPSET", "OnnxUnavailable", "save_onnx", "to_onnx", "to_onnx_bytes"]

OPSET = 17
"""The ONNX operator set the models use (ONNX 1.12+, ONNX Runtime 1.12+)."""

IR_VERSION = 8
"""The ONNX IR version that goes with `OPSET`; a newer one would shut out older runtimes for no gain."""

INSTALL_HINT = 'pip install -e ".[onnx]"'

# A protobuf message cannot exceed 2 GiB; ONNX's external-data files are not worth their
# complexity for the networks sclref trains, so larger models are refused up front.
_MAX_MODEL_BYTES = 2**31 - 2**24


class OnnxUnavailable(ImportError):
    """The `onnx` package is not installed."""


def _onnx():
    try:
        import onnx
    except ImportError as err:
        raise OnnxUnavailable(f"writing ONNX needs the onnx package; install the extra: {INSTALL_HINT}") from err
    return onnx


class _Graph:
    """Nodes and initializers of the graph being built, with unique tensor names."""

    def __init__(self, onnx):
        self.onnx, self.helper = onnx, onnx.helper
        self.nodes, self.initializers, self.names = [], [], {"input", "logits"}

    def name(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def constant(self, base: str, array) -> str:
        name = self.name(base)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list, base: str, **attrs) -> str:
        out = self.name(base)
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out


def _dense(layer: net.WeightLayer) -> np.ndarray:
    f, k = layer.weight.shape
    check_allocation((f, k), 4, f"layer {layer.name!r}: its {f}x{k} weight made dense for ONNX")
    return layer.weight.toarray().astype(np.float32)


def _add_layers(g: _Graph, layers: list, x: str, shape: tuple) -> tuple[str, tuple]:
    """Append the nodes of `layers` run on tensor `x` of per-sample `shape`; the output tensor and its shape."""
    for layer in layers:
        out_shape = net.output_shape(layer, shape)
        name = layer.name
        if isinstance(layer, net.Linear):
            w = g.constant(f"{name}.weight", _dense(layer))
            b = g.constant(f"{name}.bias", layer.bias.astype(np.float32))
            x = g.node("Gemm", [x, w, b], name, transB=1)
        elif isinstance(layer, net.Conv2d):
            (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
            weight = _dense(layer).reshape(layer.out_channels, layer.in_channels, kh, kw)
            w = g.constant(f"{name}.weight", weight)
            b = g.constant(f"{name}.bias", layer.bias.astype(np.float32))
            x = g.node("Conv", [x, w, b], name, kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, ph, pw])
        elif isinstance(layer, net.Activation):
            if layer.kind == "relu":
                x = g.node("Relu", [x], name)
            elif layer.kind == "leaky_relu":
                x = g.node("LeakyRelu", [x], name, alpha=float(layer.alpha))
            else:
                raise InputError(f"layer {name!r}: activation {layer.kind!r} has no ONNX form here")
        elif isinstance(layer, net.MaxPool2d):
            x = g.node("MaxPool", [x], name, kernel_shape=list(layer.kernel_size), strides=list(layer.stride))
        elif isinstance(layer, net.Flatten):
            x = g.node("Flatten", [x], name, axis=1)
        elif isinstance(layer, net.GlobalAvgPool2d):
            # GlobalAveragePool keeps 1x1 spatial axes; sclref's layer drops them.
            x = g.node("Flatten", [g.node("GlobalAveragePool", [x], f"{name}.pool")], name, axis=1)
        elif isinstance(layer, net.SubsamplePad):
            (sh, sw), (before, after) = layer.stride, layer.channels
            starts = g.constant(f"{name}.starts", np.zeros(2, np.int64))
            ends = g.constant(f"{name}.ends", np.full(2, np.iinfo(np.int64).max, np.int64))
            axes = g.constant(f"{name}.axes", np.array([2, 3], np.int64))
            steps = g.constant(f"{name}.steps", np.array([sh, sw], np.int64))
            x = g.node("Slice", [x, starts, ends, axes, steps], f"{name}.subsample")
            pads = g.constant(f"{name}.pads", np.array([0, before, 0, 0, 0, after, 0, 0], np.int64))
            x = g.node("Pad", [x, pads], name, mode="constant")
        elif isinstance(layer, net.Residual):
            body, _ = _add_layers(g, layer.body, x, shape)
            short, _ = _add_layers(g, layer.shortcut, x, shape)
            x = g.node("Add", [body, short], name)
        else:
            raise InputError(f"layer {name!r}: {type(layer).__name__} has no ONNX form here")
        shape = out_shape
    return x, shape


def _description(network: net.SparseNetwork, shape: tuple) -> tuple[str, dict]:
    """The model's doc_string and its metadata_props, which say what the input must be."""
    dims = ", ".join(["N", *map(str, shape)])
    pre = network.preprocessing
    if pre is None:
        doc = (f"Input 'input' ({dims}, float32): inputs standardized as for training (the network records no "
               f"preprocessing). Output 'logits'.")
        kind = "standardized"
    else:
        doc = (f"Input 'input' ({dims}, float32): raw pixels in [0, {pre['pixel_max']:g}]; the model standardizes "
               f"them first as (x / {pre['pixel_max']!r} - {pre['mean']!r}) / {pre['std']!r}. Output 'logits'.")
        kind = "raw"
    meta = {"input": kind, "preprocessing": json.dumps(pre, sort_keys=True), "nnz": str(network.nnz),
            "source": json.dumps(network.source, sort_keys=True, default=str),
            "removed_units": json.dumps({k: len(v) for k, v in sorted(network.removed_units.items())})}
    return doc, meta


def to_onnx(network: net.SparseNetwork):
    """The ONNX model (an ``onnx.ModelProto``, opset `OPSET`) computing `network` in float32.

    Parameters
    ----------
    network : SparseNetwork
        What `sclref.sparse.export` or `export_run` returns (or `load` reads).

    Returns
    -------
    onnx.ModelProto
        Input ``"input"`` of shape ``(batch, *input_shape)``, output ``"logits"``. With
        ``network.preprocessing`` set the input is raw pixels, standardized inside the
        model; otherwise it is already standardized. The model passes
        ``onnx.checker.check_model``.

    Raises
    ------
    OnnxUnavailable
        The onnx package is not installed.
    InputError
        A layer has no ONNX form, some output could overflow float32, or the dense
        weights would exceed protobuf's 2 GiB (`LimitError`).
    """
    onnx = _onnx()
    helper = onnx.helper
    if np.dtype(network.dtype).itemsize > 4:
        try:
            check_range(network, np.float32)
        except FormatError as err:
            raise InputError(f"cannot write this network as float32 ONNX: {err}") from None
    try:
        shapes = network.shapes()
    except ValueError as err:
        raise InputError(f"cannot write this network as ONNX: {err}") from None
    dense = sum(4 * (int(np.prod(layer.weight.shape)) + layer.bias.size) for layer in network.weighted())
    if dense > _MAX_MODEL_BYTES:
        raise LimitError(f"the dense weights take {dense:,} bytes; an ONNX model holds at most "
                         f"{_MAX_MODEL_BYTES:,} without external data")
    g = _Graph(onnx)
    x = "input"
    if network.preprocessing is not None:
        pre = network.preprocessing
        x = g.node("Div", [x, g.constant("pixel_max", np.float32(pre["pixel_max"]))], "scaled")
        x = g.node("Sub", [x, g.constant("mean", np.float32(pre["mean"]))], "centered")
        x = g.node("Div", [x, g.constant("std", np.float32(pre["std"]))], "standardized")
    x, _ = _add_layers(g, network.layers, x, shapes[0])
    if g.nodes and g.nodes[-1].output[0] == x:
        g.nodes[-1].output[0] = "logits"
    else:
        g.nodes.append(helper.make_node("Identity", [x], ["logits"], name="logits"))
    inputs = [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", *shapes[0]])]
    outputs = [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", *shapes[-1]])]
    graph = helper.make_graph(g.nodes, "sclref", inputs, outputs, g.initializers)
    doc, meta = _description(network, shapes[0])
    model = helper.make_model(graph, producer_name="sclref", producer_version=__version__, doc_string=doc,
                              opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    return model


def to_onnx_bytes(network: net.SparseNetwork) -> bytes:
    """The serialized `to_onnx` model: the same bytes for the same network (nothing time-dependent is stored)."""
    return to_onnx(network).SerializeToString(deterministic=True)


def save_onnx(network: net.SparseNetwork, path) -> int:
    """Write `network` as an ONNX model to `path` atomically; returns the number of bytes written."""
    data = to_onnx_bytes(network)
    atomic_write_bytes(path, data)
    return len(data)
