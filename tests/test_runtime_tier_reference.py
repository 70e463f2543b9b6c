"""The runtime tier's packages (built from numpy weights without torch) are the models they claim to
be: their logits equal a float64 reference of GPT-Neo (export/reference.py, on a transformers
GPTNeoForCausalLM holding the same weights), and the tier's conftests import nothing heavy."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from neoedge import Model
from neoedge.export.blockwise import quantize_blockwise
from neoedge.export.scheme import DEFAULT_BLOCK_SIZE, DEFAULT_SYMMETRIC
from neoedge.export.reference import exact_logits

sys.path.insert(0, str(Path(__file__).parent / "runtime_tier"))
from build_packages import LAYER_NORM_EPS, SPECS, Spec, make_weights  # noqa: E402

TESTS = Path(__file__).parent
# fp32 against float64: measured up to 2.4e-5 (logits of std ~4).
FP32_TOLERANCE = 1e-4
# int4 against the float64 reference of its own dequantized weights: what is left is MatMulNBits'
# int8 quantization of the activations (accuracy level 4), which these decisive random weights
# amplify layer by layer: relative RMS error measured 0.051, top-1 agreement 93.8% (96 positions).
# Against the unquantized weights the same package measures 0.63 and 34%: a package computing
# with other weights than its int4 ones (wrong packing, scales or block layout) cannot pass.
INT4_MAX_RELATIVE_ERROR, INT4_MIN_AGREEMENT = 0.1, 0.85


def _transformers_model(spec: Spec, arrays: dict[str, np.ndarray]):
    from transformers import GPTNeoForCausalLM

    from neoedge.export.tiny import tiny_config

    config = tiny_config(spec.vocab_size, max_position_embeddings=spec.context_length,
                         hidden_size=spec.hidden_size, num_layers=len(spec.attention_layers),
                         num_heads=spec.num_heads, attention_types=[[list(spec.attention_layers), 1]],
                         window_size=spec.window_size, layer_norm_epsilon=LAYER_NORM_EPS)
    model = GPTNeoForCausalLM(config).eval()
    state = {name: torch.from_numpy(array) for name, array in arrays.items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Only the attention's constant buffers (masks) are not weights.
    assert not unexpected and all(name.endswith(("attn.attention.bias", "attn.attention.masked_bias"))
                                  for name in missing), (missing, unexpected)
    return model


def _dequantized(weight: np.ndarray, block: int) -> np.ndarray:
    """What MatMulNBits computes with: (q - zero point) * scale, blocks along the input axis."""
    q = quantize_blockwise(weight, 4, block, symmetric=True)
    packed, scales, zeros = q.packed, q.scales, q.zero_points
    assert zeros is None
    q = np.stack([packed & 15, packed >> 4], axis=-1).reshape(*packed.shape[:2], -1).astype(np.float64)
    return ((q - 8) * scales[..., None]).reshape(weight.shape).astype(np.float32)


def _int4_weights(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    assert DEFAULT_SYMMETRIC["int4"] and DEFAULT_BLOCK_SIZE["int4"] == 128
    out = dict(arrays)
    for name, weight in arrays.items():
        if name == "transformer.wte.weight" or (weight.ndim == 2 and ".h." in name):
            block = 128
            while weight.shape[1] % block:  # the export's default block size, halved to fit
                block //= 2
            out[name] = _dequantized(weight, block)
    return out


def _ids(spec: Spec) -> np.ndarray:
    return np.random.default_rng(5).integers(0, spec.vocab_size, spec.context_length)


@pytest.mark.parametrize("name", [n for n, s in SPECS.items() if s.quantize == "none"])
def test_fp32_tier_packages_equal_the_float64_reference(tier_packages, name):
    spec = SPECS[name]
    ids = _ids(spec)
    expected = exact_logits(_transformers_model(spec, make_weights(spec)), ids)
    np.testing.assert_allclose(Model(tier_packages[name]).logits(ids.tolist()), expected, atol=FP32_TOLERANCE, rtol=0)


def test_the_int4_tier_package_computes_with_its_int4_weights(tier_packages):
    spec = SPECS["int4"]
    ids = _ids(spec)
    got = Model(tier_packages["int4"]).logits(ids.tolist())
    expected = exact_logits(_transformers_model(spec, _int4_weights(make_weights(spec))), ids)
    unquantized = exact_logits(_transformers_model(spec, make_weights(spec)), ids)
    assert _relative_error(got, expected) <= INT4_MAX_RELATIVE_ERROR
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= INT4_MIN_AGREEMENT
    assert _relative_error(got, unquantized) > 4 * INT4_MAX_RELATIVE_ERROR


def _relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.sqrt(np.mean((got - expected) ** 2) / np.mean(expected ** 2)))


def test_the_tier_conftests_import_nothing_heavy():
    """tests/conftest.py and tests/runtime_tier/conftest.py import in an interpreter where torch,
    transformers, optimum and onnx cannot be imported (as in the runtime-only venv of .ci/run)."""
    code = textwrap.dedent(f"""
        import importlib.util, sys
        for name in ("torch", "transformers", "optimum", "onnx"):
            sys.modules[name] = None
        for i, path in enumerate([{str(TESTS / "conftest.py")!r}, {str(TESTS / "runtime_tier" / "conftest.py")!r}]):
            spec = importlib.util.spec_from_file_location(f"conftest_{{i}}", path)
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr
