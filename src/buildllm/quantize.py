"""Stage 6, faster: int8 weights for generation.

Generating one token at a time does little arithmetic per weight: every weight matrix is read
from memory once per new token, multiplied by a single vector and dropped. On a CPU the speed of
that loop is set by how many bytes of weights stream from memory, not by the multiplications.
GPT-2 124M in fp32 is 500 MB per token; with int8 weights it is 125 MB.

*Weight-only* quantization stores each row of a weight matrix (one output feature) as int8
numbers times one scale for the row, ``w ≈ q * scale`` with ``q`` in [-127, 127] and
``scale = max|w_row| / 127`` (symmetric, per output channel). Activations are not quantized:
the matrix product runs in bf16 through PyTorch's fused kernel, which converts the int8 weights
on the fly, so nothing larger than int8 is ever read. The error per weight is at most half a
step (``scale / 2``), a relative 0.4% of the row's largest weight.

    model = quantize_int8(model)  # every nn.Linear, output head included, in place

This is for inference: the int8 weights have no gradients, and a quantized model is not saved
(save the fp32 model and quantize it again after loading: it takes a second).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from buildllm.errors import UserError

MAX_INT8 = 127  # symmetric: -127..127, so that -q is always representable


class Int8Linear(nn.Module):
    """``nn.Linear`` with its weight stored as int8 rows, each with its own scale."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        # bf16, because the kernel takes its scales in the activations' dtype; the scales are
        # chosen as bf16 numbers to begin with (see from_linear), so no rounding happens here.
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.bfloat16, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device)
        scale = (w.abs().amax(dim=1) / MAX_INT8).clamp(min=1e-12).to(torch.bfloat16)
        q.scale.copy_(scale)
        # Dividing by the scale as stored makes dequantization (q * scale) the exact inverse.
        q.weight.copy_(torch.round(w / scale.float()[:, None]).clamp(-MAX_INT8, MAX_INT8).to(torch.int8))
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach().float())
        return q

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight matrix the int8 numbers stand for: ``q * scale``, row by row."""
        return self.weight.to(dtype) * self.scale.to(dtype)[:, None]

    def written_out(self, x: torch.Tensor) -> torch.Tensor:
        """The definition: an ordinary linear layer with the dequantized weight."""
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized(x.dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":  # PyTorch has the fused kernel for CPU tensors only
            return self.written_out(x)
        # The kernel takes a 2-D bf16 input and reads the int8 weight as is. The residual stream
        # around it stays in the caller's dtype; only the matrix product runs in bf16.
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch._weight_int8pack_mm(rows, self.weight, self.scale).to(x.dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` with an ``Int8Linear``, in place; returns ``model``.

    With tied embeddings the output head gets its own int8 copy while the token embedding stays
    as it was (a lookup reads one row per token, so its size costs no speed).
    """
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:  # not subclasses, whose forward may do more
                setattr(parent, name, Int8Linear.from_linear(child))
                replaced += 1
    if replaced == 0:
        raise UserError("the model has no nn.Linear layers to quantize (was it quantized already?)")
    return model.eval()


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


def refuse_quantized(model: nn.Module, action: str) -> None:
    """Raise ``UserError`` if ``model`` holds int8 layers: ``action`` needs the full-precision weights."""
    if is_quantized(model):
        raise UserError(f"cannot {action} a model quantized to int8: {action} the full-precision model "
                        "and quantize it again after loading (quantize_int8 takes a second)")
