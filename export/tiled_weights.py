"""The tiled kernel graph: the kernel graph with the weights its AVX-512 VNNI path tiles stored
already tiled, in a weights file of their own (an opt-in package part: `--tiled-weights`).

Why: the kernel graph lets its MatMulNBits kernels rearrange B and scales in place, in memory
onnxruntime mapped privately from the package's weights file (neoedge/kernels/tiled.h). Each page
written is then a private copy the kernel makes on the first write, and new memory costs about a
microsecond a page on the VMs measured: the 1.3B's cold start took 1.18-1.27x as long as with
untiled weights. Weights stored tiled are mapped and read as they are, like the stock graph's.
The cost is package size: the tiled copies of every MatMulNBits' B and scales (about the size of
the weights file again). The stock graph and the kernel graph are untouched: CPUs without the
tiled path, NEOEDGE_KERNELS_TILED=0 and other runtimes read those.

Its MatMulNBits nodes become neoedge.kernels::MatMulNBitsTiled (the same inputs and attributes
but rearrange_weights). The layout is tiled.h's: rows in tiles of 16 (the last one holds N mod 16 if that is not 0),
tile t starting where its first row did, its rows' dwords dword-major (dword d of the tile's row r
at byte 16 t R + (d h + r) 4 for R bytes a row and h rows in the tile); scales likewise, one float
per (row, block). Export-time only (needs onnx).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .kernel_graph import KERNEL_DOMAIN, _attributes
from .weights_file import ExternalWeights

TILE_HEIGHT = 16  # neoedge::kTileHeight
TILED_OP = "MatMulNBitsTiled"  # neoedge.kernels' MatMulNBits over weights stored tiled


@dataclass(frozen=True)
class TiledGraphReport:
    path: Path
    data: Path
    tensors: int  # B and scales tensors stored tiled
    nodes: int  # MatMulNBits nodes reading them
    bytes: int  # size of the data file

    def describe(self) -> str:
        return (f"{self.path.name}: {self.nodes} MatMulNBits node(s) read {self.tensors} tensors stored tiled in "
                f"{self.data.name} ({self.bytes / 1e6:.1f} MB)")


def tile_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """`array` viewed as [rows, width] of 4-byte elements, in the tiled order (flat, same bytes)."""
    return _rearrange(array, rows, undo=False)


def untile_rows(tiled: np.ndarray, rows: int) -> np.ndarray:
    """tile_rows undone (the plain layout back, flat): the check that a stored copy is exact."""
    return _rearrange(tiled, rows, undo=True)


def _rearrange(array: np.ndarray, rows: int, *, undo: bool) -> np.ndarray:
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    if flat.size % (rows * 4):
        raise ValueError(f"{flat.size} bytes are not {rows} rows of whole 4-byte elements")
    words = flat.view(np.uint32).reshape(rows, -1)
    full = rows // TILE_HEIGHT * TILE_HEIGHT
    width = words.shape[1]
    out = np.empty_like(words)
    if full:  # whole tiles: [tile, row, element] <-> [tile, element, row]
        shape = (full // TILE_HEIGHT, width, TILE_HEIGHT) if undo else (full // TILE_HEIGHT, TILE_HEIGHT, width)
        out[:full] = words[:full].reshape(shape).transpose(0, 2, 1).reshape(full, width)
    if full < rows:  # the last tile, of the h rows left
        h = rows - full
        out[full:] = words[full:].reshape(width, h).T if undo else words[full:].T.reshape(h, width)
    return out.reshape(-1).view(np.uint8)


def write_tiled_kernel_graph(kernel_graph_path: str | Path, out_graph: str | Path,
                             out_data: str | Path) -> TiledGraphReport | None:
    """Writes the tiled kernel graph of `kernel_graph_path` and its weights file (both beside it);
    None (nothing written) if no node of the kernel graph tiles its weights."""
    source, graph_out, data_out = Path(kernel_graph_path), Path(out_graph), Path(out_data)
    directory = source.resolve().parent
    if graph_out.resolve().parent != directory or data_out.resolve().parent != directory:
        raise ValueError("the tiled kernel graph and its weights go beside the kernel graph")
    model = onnx.load(str(source), load_external_data=False)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    tiling = [n for n in graph.node if n.domain == KERNEL_DOMAIN and n.op_type == "MatMulNBits"
              and _attributes(n).get("rearrange_weights") == 1]
    if not tiling:
        return None
    taken = set(initializers) | {name for node in graph.node for name in (*node.input, *node.output)}
    tiled_names: dict[str, str] = {}  # original initializer -> its tiled copy
    tensors: list[onnx.TensorProto] = []
    with ExternalWeights(data_out) as weights:
        for node in tiling:
            n = int(_attributes(node)["N"])
            for name in node.input[1:3]:
                if name in tiled_names:
                    continue
                original = numpy_helper.to_array(initializers[name], base_dir=str(directory))
                tiled = tile_rows(original, n)
                # The copy must hold exactly the validated weights, rearranged: undone, it gives them back.
                if not np.array_equal(untile_rows(tiled, n), original.reshape(-1).view(np.uint8)):
                    raise ValueError(f"{name}: the tiled copy does not give back the weights")
                copy_name = f"{name}.tiled"
                if copy_name in taken:
                    raise ValueError(f"the kernel graph already has a tensor named {copy_name!r}")
                tensors.append(weights.tensor(copy_name, tiled.view(original.dtype).reshape(original.shape)))
                tiled_names[name] = copy_name
    for node in tiling:
        for i in (1, 2):
            node.input[i] = tiled_names[node.input[i]]
        # An op name of its own: a kernel library from before it refuses the graph, rather than
        # taking the attribute for permission to rearrange the weights a second time.
        node.op_type = TILED_OP
        kept_attributes = [a for a in node.attribute if a.name != "rearrange_weights"]
        del node.attribute[:]
        node.attribute.extend(kept_attributes)
    # The tied embedding's table gather reads the lm_head's B, in either layout (its scales are its own).
    for node in graph.node:
        if node.domain == KERNEL_DOMAIN and node.op_type == "GatherBlockQuantized" and node.input[0] in tiled_names:
            node.input[0] = tiled_names[node.input[0]]
    still_read = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in still_read]
    del graph.initializer[:]
    graph.initializer.extend(kept + tensors)
    onnx.save(model, str(graph_out))
    return TiledGraphReport(graph_out, data_out, len(tensors), len(tiling), data_out.stat().st_size)
