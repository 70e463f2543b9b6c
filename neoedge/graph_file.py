"""What the runtime must know about an ONNX file before onnxruntime opens it, read without the onnx
package (the runtime does not have it): the files its tensors' external data live in, the shapes of
the graph's initializers, and its nodes' integer attributes.

An ONNX file is a protobuf `ModelProto`. This reads only the few fields below (numbers from
onnx.proto) and skips every other field by its wire type, so it reads a 60 KB graph in a few
milliseconds and never copies the bytes of an initializer stored inside the file. Tensors can sit
in initializers, sparse initializers, node attributes, subgraphs (If/Loop/Scan bodies), functions and
training graphs: every one is visited, so no external data reference is missed.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import GraphMismatchError

# ModelProto
_MODEL_GRAPH, _MODEL_TRAINING_INFO, _MODEL_FUNCTIONS = 7, 20, 25
# TrainingInfoProto: initialization, algorithm (both GraphProto)
_TRAINING_GRAPHS = (1, 2)
# GraphProto
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
# NodeProto
_NODE_INPUT, _NODE_OP_TYPE, _NODE_ATTRIBUTE, _NODE_DOMAIN = 1, 4, 5, 7
# AttributeProto
_ATTR_NAME, _ATTR_I, _ATTR_TYPE = 1, 3, 20
_ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE = (5, 10), (6, 11), (22, 23)
_ATTR_TYPE_INT = 2
# FunctionProto
_FUNCTION_NODE, _FUNCTION_ATTRIBUTE = 7, 11
# SparseTensorProto: values, indices (both TensorProto)
_SPARSE_TENSORS = (1, 2)
# TensorProto
_TENSOR_DIMS, _TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 1, 8, 13, 14
# StringStringEntryProto
_ENTRY_KEY, _ENTRY_VALUE = 1, 2

# Graphs nest (a Loop body holding an If holding ...); ours do not nest at all.
_MAX_DEPTH = 16


@dataclass(frozen=True)
class ExternalData:
    """One tensor whose bytes live in another file."""

    tensor: str
    location: str
    offset: int
    length: int | None


@dataclass(frozen=True)
class Node:
    """One node of the main graph."""

    op_type: str
    domain: str
    inputs: tuple[str, ...]
    ints: dict[str, int]
    """The node's integer attributes."""


@dataclass(frozen=True)
class GraphFile:
    """What an ONNX file holds, as far as the runtime checks it."""

    external_data: tuple[ExternalData, ...]
    """Every external data reference, from every tensor anywhere in the model."""
    initializers: dict[str, tuple[int, ...]]
    """The main graph's initializers: name -> dimensions."""
    nodes: tuple[Node, ...]
    """The main graph's nodes."""

    @property
    def external_files(self) -> tuple[str, ...]:
        """The distinct files the external data lives in, in order of first use."""
        return tuple(dict.fromkeys(entry.location for entry in self.external_data))


class _Malformed(Exception):
    pass


def read_graph_file(data: bytes, name: str) -> GraphFile:
    """Parse the parts of an ONNX ModelProto the runtime checks; GraphMismatchError if it is not one."""
    reader = _Reader(data)
    try:
        reader.model()
    except (_Malformed, IndexError, UnicodeDecodeError) as exc:
        raise GraphMismatchError(f"{name} is not a valid ONNX model file ({exc or 'truncated'})") from None
    if not reader.found_graph:
        raise GraphMismatchError(f"{name} is not a valid ONNX model file (it holds no graph)")
    return GraphFile(tuple(reader.external), reader.initializers, tuple(reader.nodes))


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.buf = bytes(data)
        self.external: list[ExternalData] = []
        self.initializers: dict[str, tuple[int, ...]] = {}
        self.nodes: list[Node] = []
        self.found_graph = False

    # -- wire format ------------------------------------------------------------------------------
    def varint(self, pos: int) -> tuple[int, int]:
        buf, result, shift = self.buf, 0, 0
        while True:
            byte = buf[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result, pos
            shift += 7
            if shift > 63:
                raise _Malformed("a varint is longer than 10 bytes")

    def fields(self, start: int, end: int) -> list[tuple[int, int, int, int]]:
        """(field number, wire type, value or start, end) of each field in buf[start:end]: wire type
        0 gives (value, -1), 2 gives the (start, end) of its bytes; fixed-size fields are skipped."""
        buf, varint, out = self.buf, self.varint, []
        pos = start
        while pos < end:
            key = buf[pos]
            if key < 0x80:  # every field number below 16 (all of ours) fits one byte
                pos += 1
            else:
                key, pos = varint(pos)
            number, wire = key >> 3, key & 7
            if wire == 2:
                length = buf[pos]
                if length < 0x80:
                    pos += 1
                else:
                    length, pos = varint(pos)
                if pos + length > end:
                    raise _Malformed("a field runs past the end of its message")
                out.append((number, 2, pos, pos + length))
                pos += length
            elif wire == 0:
                value = buf[pos]
                if value < 0x80:
                    pos += 1
                else:
                    value, pos = varint(pos)
                out.append((number, 0, value, -1))
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            else:
                raise _Malformed(f"unsupported protobuf wire type {wire}")
        if pos != end:
            raise _Malformed("a message runs past its end")
        return out

    def text(self, start: int, end: int) -> str:
        return self.buf[start:end].decode("utf-8")

    @staticmethod
    def signed(value: int) -> int:
        return value - (1 << 64) if value >= 1 << 63 else value

    # -- messages ---------------------------------------------------------------------------------
    def model(self) -> None:
        for number, wire, a, b in self.fields(0, len(self.buf)):
            if wire != 2:
                continue
            if number == _MODEL_GRAPH:
                self.found_graph = True
                self.graph(a, b, depth=0, main=True)
            elif number == _MODEL_FUNCTIONS:
                self.function(a, b, depth=1)
            elif number == _MODEL_TRAINING_INFO:
                for n, w, c, d in self.fields(a, b):
                    if w == 2 and n in _TRAINING_GRAPHS:
                        self.graph(c, d, depth=1, main=False)

    def graph(self, start: int, end: int, *, depth: int, main: bool) -> None:
        if depth > _MAX_DEPTH:
            raise _Malformed(f"subgraphs nest more than {_MAX_DEPTH} deep")
        for number, wire, a, b in self.fields(start, end):
            if wire != 2:
                continue
            if number == _GRAPH_NODE:
                self.node(a, b, depth=depth, main=main)
            elif number == _GRAPH_INITIALIZER:
                name, dims = self.tensor(a, b)
                if main:
                    self.initializers[name] = dims
            elif number == _GRAPH_SPARSE_INITIALIZER:
                self.sparse(a, b)

    def function(self, start: int, end: int, *, depth: int) -> None:
        for number, wire, a, b in self.fields(start, end):
            if wire == 2 and number == _FUNCTION_NODE:
                self.node(a, b, depth=depth, main=False)
            elif wire == 2 and number == _FUNCTION_ATTRIBUTE:
                self.attribute(a, b, depth=depth)

    def node(self, start: int, end: int, *, depth: int, main: bool) -> None:
        op_type = domain = ""
        inputs: list[str] = []
        ints: dict[str, int] = {}
        for number, wire, a, b in self.fields(start, end):
            if wire != 2:
                continue
            if number == _NODE_ATTRIBUTE:
                attribute = self.attribute(a, b, depth=depth)
                if attribute is not None:
                    ints[attribute[0]] = attribute[1]
            elif main and number == _NODE_INPUT:
                inputs.append(self.text(a, b))
            elif main and number == _NODE_OP_TYPE:
                op_type = self.text(a, b)
            elif main and number == _NODE_DOMAIN:
                domain = self.text(a, b)
        if main:
            self.nodes.append(Node(op_type, domain, tuple(inputs), ints))

    def attribute(self, start: int, end: int, *, depth: int) -> tuple[str, int] | None:
        """Visits the attribute's tensors and graphs; returns (name, value) of an integer attribute."""
        name, value, kind = "", None, None
        for number, wire, a, b in self.fields(start, end):
            if wire == 0:
                if number == _ATTR_I:
                    value = self.signed(a)
                elif number == _ATTR_TYPE:
                    kind = a
            elif number == _ATTR_NAME:
                name = self.text(a, b)
            elif number in _ATTR_TENSORS:
                self.tensor(a, b)
            elif number in _ATTR_GRAPHS:
                self.graph(a, b, depth=depth + 1, main=False)
            elif number in _ATTR_SPARSE:
                self.sparse(a, b)
        if value is not None and kind in (None, _ATTR_TYPE_INT):
            return name, value
        return None

    def sparse(self, start: int, end: int) -> None:
        for number, wire, a, b in self.fields(start, end):
            if wire == 2 and number in _SPARSE_TENSORS:
                self.tensor(a, b)

    def tensor(self, start: int, end: int) -> tuple[str, tuple[int, ...]]:
        name = ""
        dims: list[int] = []
        entries: list[tuple[int, int]] = []
        for number, wire, a, b in self.fields(start, end):
            if number == _TENSOR_DIMS:
                if wire == 0:
                    dims.append(self.signed(a))
                elif wire == 2:  # packed
                    pos = a
                    while pos < b:
                        value, pos = self.varint(pos)
                        dims.append(self.signed(value))
            elif wire == 2 and number == _TENSOR_NAME:
                name = self.text(a, b)
            elif wire == 2 and number == _TENSOR_EXTERNAL_DATA:
                entries.append((a, b))
        # External data is recorded whatever data_location says: a reference onnxruntime might follow
        # must be checked either way.
        if entries:
            self.external.append(self.external_entry(name, entries))
        return name, tuple(dims)

    def external_entry(self, tensor: str, entries: list[tuple[int, int]]) -> ExternalData:
        values: dict[str, str] = {}
        buf = self.buf
        for start, end in entries:
            # The usual layout, key then value, each shorter than 128 bytes, read directly (a graph
            # has thousands of these); anything else goes through the general reader.
            key_length = buf[start + 1] if end - start >= 2 else 0x80
            value_at = start + 2 + key_length
            if buf[start] == 0x0A and key_length < 0x80 and value_at + 2 <= end and buf[value_at] == 0x12 \
                    and buf[value_at + 1] < 0x80 and value_at + 2 + buf[value_at + 1] == end:
                values[self.text(start + 2, value_at)] = self.text(value_at + 2, end)
                continue
            key = value = ""
            for number, wire, a, b in self.fields(start, end):
                if wire == 2 and number == _ENTRY_KEY:
                    key = self.text(a, b)
                elif wire == 2 and number == _ENTRY_VALUE:
                    value = self.text(a, b)
            values[key] = value
        if "location" not in values:
            raise _Malformed(f"tensor {tensor!r} has external data without a location")
        try:
            offset = int(values.get("offset", "0"))
            length = int(values["length"]) if "length" in values else None
        except ValueError:
            raise _Malformed(f"tensor {tensor!r} has a non-numeric external data offset or length") from None
        if offset < 0 or (length is not None and length < 0):
            raise _Malformed(f"tensor {tensor!r} has a negative external data offset or length")
        return ExternalData(tensor, values["location"], offset, length)
