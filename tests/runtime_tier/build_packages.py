"""Build the runtime tier's packages from seeded numpy weights, without torch or transformers.

    python tests/runtime_tier/build_packages.py OUT_DIR

Run with the test venv (building an ONNX graph needs the `onnx` package): torch, transformers and
optimum are made unimportable before anything else is imported, and the run fails if any of them
(or safetensors / huggingface_hub, which only a checkpoint loader would need) was imported anyway.
The packages go through export's own graph builder (`build_decoder`), weights writer and manifest,
exactly as `neoedge export` writes them, minus the transformers check (tests/test_runtime_tier_reference.py
checks them against a float64 reference instead) and the onnxruntime graph optimization pass (the
runtime optimizes at load either way).

Importing this module imports only the standard library: the tier's conftest uses `ensure_packages`
in a runtime-only install, where there is no onnx.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BLOCKED = ("torch", "transformers", "optimum")
# Never needed by the builder: importing one would mean a checkpoint path crept in.
MUST_NOT_LOAD = BLOCKED + ("safetensors", "huggingface_hub", "accelerate")
DONE_FILE = "built.json"
# Environment variable naming a directory that already holds the packages (CI builds them with
# the test venv and runs the tier with a runtime-only venv).
ENV_VAR = "NEOEDGE_RUNTIME_TIER_PACKAGES"


@dataclass(frozen=True)
class Spec:
    """One package: a tiny GPT-Neo shape, its weights' seed, and how it is stored."""

    seed: int
    attention: str  # "gqa" or "plain"
    quantize: str = "none"  # "none" or "int4" (float32 KV cache: int8 scales need calibration)
    hidden_size: int = 64
    num_heads: int = 4
    attention_layers: tuple[str, ...] = ("global", "local", "global", "local")
    window_size: int = 8
    context_length: int = 96
    vocab_size: int = 512


# "gqa" and "plain" share their weights (seed): the two attention implementations must agree.
# "int4" is the same model again, block-quantized as `neoedge export --quantize int4` does.
SPECS: dict[str, Spec] = {
    "gqa": Spec(seed=1, attention="gqa"),
    "plain": Spec(seed=1, attention="plain"),
    "int4": Spec(seed=1, attention="gqa", quantize="int4"),
    # Starts with a local layer, odd layer count, head size 12 (which only plain attention takes).
    "plain-h12": Spec(seed=2, attention="plain", hidden_size=48, num_heads=4,
                      attention_layers=("local", "global", "local"), window_size=4, context_length=64),
}
LAYER_NORM_EPS = 1e-5
# Large enough that the models are decisive (logit spread of several nats), so that a wrong
# attention mask or cache shows in greedy tokens, not only in the fourth decimal.
WEIGHT_STD = 0.15


def make_weights(spec: Spec):
    """GPT-Neo weights as numpy float32 arrays, in transformers' names and torch's [out, in] layout."""
    import numpy as np

    rng = np.random.default_rng(spec.seed)
    h, inner = spec.hidden_size, 4 * spec.hidden_size

    def normal(*shape: int, std: float = WEIGHT_STD) -> np.ndarray:
        return rng.normal(0.0, std, shape).astype(np.float32)

    arrays = {"transformer.wte.weight": normal(spec.vocab_size, h, std=0.5),
              "transformer.wpe.weight": normal(spec.context_length, h, std=0.1)}
    for i in range(len(spec.attention_layers)):
        p = f"transformer.h.{i}"
        arrays.update({
            f"{p}.ln_1.weight": 1.0 + normal(h, std=0.1), f"{p}.ln_1.bias": normal(h, std=0.05),
            f"{p}.attn.attention.q_proj.weight": normal(h, h),
            f"{p}.attn.attention.k_proj.weight": normal(h, h),
            f"{p}.attn.attention.v_proj.weight": normal(h, h),
            f"{p}.attn.attention.out_proj.weight": normal(h, h),
            f"{p}.attn.attention.out_proj.bias": normal(h, std=0.05),
            f"{p}.ln_2.weight": 1.0 + normal(h, std=0.1), f"{p}.ln_2.bias": normal(h, std=0.05),
            f"{p}.mlp.c_fc.weight": normal(inner, h), f"{p}.mlp.c_fc.bias": normal(inner, std=0.05),
            f"{p}.mlp.c_proj.weight": normal(h, inner), f"{p}.mlp.c_proj.bias": normal(h, std=0.05),
        })
    arrays["transformer.ln_f.weight"] = 1.0 + normal(h, std=0.1)
    arrays["transformer.ln_f.bias"] = normal(h, std=0.05)
    return arrays


def model_info(spec: Spec, source: str):
    from neoedge.manifest import ModelInfo

    return ModelInfo(architecture="GPTNeoForCausalLM", vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                     num_layers=len(spec.attention_layers), num_heads=spec.num_heads,
                     context_length=spec.context_length, window_size=spec.window_size,
                     attention_layers=spec.attention_layers, bos_token_id=0, eos_token_id=0, source=source)


def tokenizer_json(vocab_size: int) -> str:
    """A byte-level BPE (`<|endoftext|>` = id 0) trained on the standard library's docstrings."""
    from neoedge.export.tiny import stdlib_docstrings, train_tokenizer

    tokenizer = train_tokenizer(stdlib_docstrings(), vocab_size=vocab_size)
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens, not {vocab_size}")
    return tokenizer.to_str()


def build_package(name: str, spec: Spec, directory: Path, tokenizer: str) -> None:
    import onnx

    from neoedge import __version__
    from neoedge.export.graph import build_decoder
    from neoedge.export.quantize import WeightStorage
    from neoedge.export.scheme import make_scheme
    from neoedge.export.weight_quantization import quantize_weights
    from neoedge.export.weights import Weights
    from neoedge.export.weights_file import ExternalWeights
    from neoedge.manifest import GraphInfo, Manifest, Quantization, file_entries

    directory.mkdir(parents=True)
    info = model_info(spec, f"runtime-tier/{name} (seeded numpy weights, seed {spec.seed})")
    graph_info = GraphInfo(file="model.onnx", attention=spec.attention, kv_cache="float32")
    # Round-to-nearest: the data-aware algorithms calibrate through transformers, which this tier
    # never imports.
    scheme = make_scheme(spec.quantize, algorithm=None if spec.quantize == "none" else "rtn")
    quantized = quantize_weights(Weights(make_weights(spec)), scheme, info.num_layers)
    storage = WeightStorage(scheme.accuracy_level) if scheme is not None else WeightStorage()
    with ExternalWeights(directory / "model.onnx.data") as weights_file:
        graph = build_decoder(info, quantized.weights, graph_info, storage,
                              layer_norm_eps=LAYER_NORM_EPS, weights_file=weights_file)
    onnx.save_model(graph, str(directory / "model.onnx"))
    (directory / "tokenizer.json").write_text(tokenizer, encoding="utf-8")
    Manifest(model=info, graph=graph_info,
             quantization=Quantization(scheme=spec.quantize, settings=quantized.settings),
             files=file_entries(directory), generation={"max_new_tokens": 32},
             created_by=f"neoedge {__version__} (tests/runtime_tier/build_packages.py)").write(directory)


def build_all(root: Path) -> dict[str, Path]:
    """Every package of SPECS under `root` (which must not exist yet), then the done marker."""
    root.mkdir(parents=True)
    tokenizers = {size: tokenizer_json(size) for size in {s.vocab_size for s in SPECS.values()}}
    for name, spec in SPECS.items():
        build_package(name, spec, root / name, tokenizers[spec.vocab_size])
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in MUST_NOT_LOAD and sys.modules[m] is not None)
    if loaded:
        raise RuntimeError(f"building the runtime tier's packages imported {', '.join(loaded)}")
    (root / DONE_FILE).write_text(json.dumps({"packages": sorted(SPECS), "imported": loaded}), encoding="utf-8")
    return {name: root / name for name in SPECS}


def packages_in(root: Path) -> dict[str, Path]:
    if not (root / DONE_FILE).is_file():
        raise FileNotFoundError(f"{root} holds no complete runtime-tier build ({DONE_FILE} is missing): "
                                f"run python tests/runtime_tier/build_packages.py {root}")
    return {name: root / name for name in SPECS}


def ensure_packages(scratch: Path) -> dict[str, Path]:
    """The packages: from $NEOEDGE_RUNTIME_TIER_PACKAGES if set, else built now under `scratch` by
    this script in a fresh interpreter with torch and transformers blocked (needs onnx)."""
    given = os.environ.get(ENV_VAR)
    if given:
        return packages_in(Path(given))
    root = Path(scratch) / "runtime-tier-packages"
    result = subprocess.run([sys.executable, __file__, str(root)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"building the runtime tier's packages failed (set {ENV_VAR} to a directory "
                           f"built by this script to skip building):\n{result.stderr[-4000:]}")
    return packages_in(root)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    build_all(Path(argv[0]))
    print(f"built {', '.join(SPECS)} in {argv[0]}")
    return 0


if __name__ == "__main__":
    # Before any other import: each of these now raises ImportError wherever it is imported.
    for blocked in BLOCKED:
        sys.modules[blocked] = None  # type: ignore[assignment]
    sys.exit(main(sys.argv[1:]))
