"""The package's weights file: each initializer's bytes are written as the graph is built, and the
graph keeps only where they are (ONNX external data)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper


class ExternalWeights:
    """Writes each initializer's bytes to a weights file as the graph is built; the graph keeps only
    where they are (ONNX external data).

    Built in memory, a graph holds a protobuf copy of every weight beside the checkpoint's own: a
    2.7B fp32 model would need twice its 10.6 GB before anything is written.
    """

    # Tensors smaller than this stay inside the graph; offsets are page-aligned so that onnxruntime
    # can map the file instead of reading it.
    MIN_SIZE, ALIGNMENT = 1024, 4096

    def __init__(self, path: Path) -> None:
        if sys.byteorder != "little":  # ONNX stores raw tensor data little-endian
            raise ValueError("external weights are written in this machine's byte order, which is not little-endian")
        self.path = Path(path)
        self._file = open(self.path, "wb")

    def tensor(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        array = np.ascontiguousarray(array)
        if array.nbytes < self.MIN_SIZE:
            return numpy_helper.from_array(array, name)
        offset = (self._file.tell() + self.ALIGNMENT - 1) // self.ALIGNMENT * self.ALIGNMENT
        self._file.seek(offset)
        self._file.write(array.data)
        tensor = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                                  dims=array.shape, data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", self.path.name), ("offset", offset), ("length", array.nbytes)):
            tensor.external_data.add(key=key, value=str(value))
        return tensor

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ExternalWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
