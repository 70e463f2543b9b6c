"""The MLP's activation: transformers' activation functions (ACT2FN names) as ONNX ops.

GPT-Neo's configs name the activation (`activation_function`, "gelu_new" in EleutherAI's models);
transformers builds the MLP with whichever ACT2FN entry is named. Each parameter-free one is written
here as the ops computing its exact definition; the others (prelu, xielu) have learned parameters
and are refused by export/load.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .graph_builder import GraphBuilder


# transformers' activation functions (ACT2FN names) that have no parameters, each as ONNX ops
# computing its exact definition. FastGelu computes the tanh approximation that gelu_new and its
# aliases define, with the c_fc bias fused in; the rest add the bias first.
ACTIVATIONS = ("gelu_new", "gelu_fast", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_accurate",
               "gelu", "gelu_python", "gelu_10", "quick_gelu", "laplace", "relu", "relu6", "relu2",
               "leaky_relu", "silu", "swish", "mish", "sigmoid", "tanh", "linear")


def mlp_activation(g: GraphBuilder, where: str, name: str, x: str, bias: str) -> str:
    """activation(x + bias), exactly as transformers defines `name`."""
    if name in ("gelu_new", "gelu_fast", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_accurate"):
        return g.op("FastGelu", [x, bias], f"{where}/FastGelu", domain="com.microsoft")
    x = g.op("Add", [x, bias], f"{where}/act/Add")
    f32 = np.float32

    def erf_gelu(v: str, scope: str) -> str:  # x * 0.5 * (1 + erf(x / sqrt(2)))
        e = g.op("Erf", [g.op("Div", [v, g.constant(np.sqrt(2.0), f32)], f"{scope}/Div")], f"{scope}/Erf")
        e = g.op("Add", [e, g.constant(1.0, f32)], f"{scope}/Add")
        return g.op("Mul", [g.op("Mul", [v, g.constant(0.5, f32)], f"{scope}/half/Mul"), e], f"{scope}/Mul")

    if name in ("gelu", "gelu_python"):
        return erf_gelu(x, f"{where}/Gelu")
    if name == "gelu_10":
        return g.op("Clip", [erf_gelu(x, f"{where}/Gelu"), g.constant(-10.0, f32), g.constant(10.0, f32)],
                    f"{where}/Clip")
    if name == "quick_gelu":  # x * sigmoid(1.702 x)
        s = g.op("Sigmoid", [g.op("Mul", [x, g.constant(1.702, f32)], f"{where}/scale/Mul")], f"{where}/Sigmoid")
        return g.op("Mul", [x, s], f"{where}/Mul")
    if name == "laplace":  # 0.5 * (1 + erf((x - mu) / (sigma * sqrt(2)))), mu=0.707107, sigma=0.282095
        v = g.op("Sub", [x, g.constant(0.707107, f32)], f"{where}/Sub")
        v = g.op("Div", [v, g.constant(0.282095 * np.sqrt(2.0), f32)], f"{where}/Div")
        v = g.op("Add", [g.op("Erf", [v], f"{where}/Erf"), g.constant(1.0, f32)], f"{where}/Add")
        return g.op("Mul", [v, g.constant(0.5, f32)], f"{where}/Mul")
    if name == "relu":
        return g.op("Relu", [x], f"{where}/Relu")
    if name == "relu6":
        return g.op("Clip", [x, g.constant(0.0, f32), g.constant(6.0, f32)], f"{where}/Clip")
    if name == "relu2":
        r = g.op("Relu", [x], f"{where}/Relu")
        return g.op("Mul", [r, r], f"{where}/Mul")
    if name == "leaky_relu":  # torch.nn.LeakyReLU's default slope
        return g.op("LeakyRelu", [x], f"{where}/LeakyRelu", alpha=0.01)
    if name in ("silu", "swish"):
        return g.op("Mul", [x, g.op("Sigmoid", [x], f"{where}/Sigmoid")], f"{where}/Mul")
    if name == "mish":  # x * tanh(softplus(x))
        return g.op("Mul", [x, g.op("Tanh", [g.op("Softplus", [x], f"{where}/Softplus")], f"{where}/Tanh")],
                    f"{where}/Mul")
    if name == "sigmoid":
        return g.op("Sigmoid", [x], f"{where}/Sigmoid")
    if name == "tanh":
        return g.op("Tanh", [x], f"{where}/Tanh")
    if name == "linear":
        return x
    raise ValueError(f"activation_function {name!r} has no exact ONNX form here")
