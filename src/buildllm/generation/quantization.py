"""Stage 6, faster: int8 and int4 weights for generation.

Generating one token at a time does little arithmetic per weight: every weight matrix is read
from memory once per new token, multiplied by a single vector and dropped. On a CPU the speed of
that loop is set by how many bytes of weights stream from memory, not by the multiplications.
GPT-2 124M in fp32 is 500 MB per token; with int8 weights it is 125 MB, with int4 about 80 MB
(62 MB of 4-bit codes and 16 MB of bf16 scales and zeros, one pair per 32 weights).

*Weight-only* quantization stores the weights as small integers and a few floats that map them
back; activations are not quantized. The matrix product runs in bf16 over the weights the integers
stand for, which are never written out whole: the compiled extension (``fast_decode.cpp``,
``quantized_matmul``) turns a chunk of them at a time into bf16 in the cache and multiplies there;
without it, PyTorch's fused int8/int4 kernels convert them on the fly. (The C++ decoding step,
``fast_decode.py``, multiplies int8 and int4 codes by its inputs rounded to int8 numbers per block
of 32, as llama.cpp does for its Q8_0 and Q4_0 formats: a batch of rows then costs far fewer
instructions.)

- ``int8``: each row (one output feature) is ``q * scale``, ``q`` in [-127, 127], ``scale =
  max|row| / 127`` (symmetric, per output channel). The error per weight is at most half a step,
  a relative 0.4% of the row's largest weight. Practically lossless.
- ``int4``: each row is cut into groups of ``group_size`` weights (32 by default); a group is
  ``(q - 8) * scale + zero`` with ``q`` in 0..15, spanning the group from its minimum to its
  maximum (asymmetric, per group, as in GPTQ/llama.cpp-style formats). 16 levels are coarse, so
  it costs some accuracy; it is the fastest.

    model = quantize(model, "int8")  # every nn.Linear, output head included, in place

This is for inference: the integer weights have no gradients, and a quantized model is not saved
(save the full-precision model and quantize it again after loading: it takes a second).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from buildllm.errors import UserError
from buildllm.generation.native import extension

MAX_INT8 = 127  # symmetric: -127..127, so that -q is always representable
MATRIX_ROWS = 32  # from this many input rows on, a layer multiplies through the bf16 matrix product (so does quantized_matmul)
TILE_ROWS = 16  # int8 and int4 rows are stored in tiles of this many, as the fast decoding step multiplies them
INPUT_BLOCK = 32  # and int8 rows padded to a multiple of this many inputs, the step's blocks of int8 inputs


class QuantizedLinear(nn.Module):
    """What the int8 and int4 layers share: the bias, the written-out form, and the call into a
    kernel that reads the integer weights as they are stored (the compiled extension's, else
    PyTorch's fused CPU kernel).

    A subclass says what its integers stand for (``dequantized``) and how its kernel multiplies
    (``_kernel``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def _kernel(self, rows: torch.Tensor) -> torch.Tensor:
        """``(rows, in)`` bf16 -> ``(rows, at least out)`` bf16, through the fused kernel."""
        raise NotImplementedError

    def written_out(self, x: torch.Tensor) -> torch.Tensor:
        """The definition: an ordinary linear layer with the dequantized weight."""
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized(x.dtype), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":  # PyTorch has the fused kernels for CPU tensors only
            return self.written_out(x)
        # The kernels take a 2-D bf16 input. The residual stream around them stays in the
        # caller's dtype; only the matrix product runs in bf16.
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = self._kernel(rows)[:, : self.out_features].to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantizedLinear):
    """``nn.Linear`` with its weight stored as int8 rows, each with its own scale."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__(in_features, out_features, bias, device)
        # In tiles of 16 rows, in the order the fast decoding step reads them (see int8_in_tiles);
        # codes() gives them back row by row.
        rows, width = -(-out_features // TILE_ROWS) * TILE_ROWS, -(-in_features // INPUT_BLOCK) * INPUT_BLOCK
        self.register_buffer("weight", torch.zeros(rows, width, dtype=torch.int8, device=device))
        # bf16, because the kernel takes its scales in the activations' dtype; the scales are
        # chosen as bf16 numbers to begin with (see from_linear), so no rounding happens here.
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.bfloat16, device=device))
        # The codes in rows for PyTorch's int8 kernel, where it decodes (see _kernel).
        self.register_buffer("_kernel_weight", None, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device)
        scale = (w.abs().amax(dim=1) / MAX_INT8).clamp(min=1e-12).to(torch.bfloat16)
        q.scale.copy_(scale)
        # Dividing by the scale as stored makes dequantization (q * scale) the exact inverse.
        q.weight.copy_(int8_in_tiles(torch.round(w / scale.float()[:, None]).clamp(-MAX_INT8, MAX_INT8).to(torch.int8)))
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach().float())
        return q

    def codes(self) -> torch.Tensor:
        """The int8 numbers, ``(out, in)``."""
        return int8_by_row(self.weight)[: self.out_features, : self.in_features]

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight matrix the int8 numbers stand for: ``q * scale``, row by row."""
        return self.codes().to(dtype) * self.scale.to(dtype)[:, None]

    def _kernel(self, rows: torch.Tensor) -> torch.Tensor:
        if (native := extension()) is not None:
            # The codes as bf16 (exact: every integer up to 256 is a bf16 number) through the bf16
            # product, a chunk of rows at a time in the compiled extension, then the scales, as
            # below: at 128 rows several times faster than PyTorch's int8 kernel, and at one row
            # (a prompt's last position through the output head) it needs no second copy of the
            # codes in that kernel's own arrangement.
            return native.quantized_matmul(rows, self.weight, self.scale, None, 0, self.in_features, self.out_features)
        if rows.shape[0] >= MATRIX_ROWS or self.in_features % 16:
            # PyTorch's int8 kernel multiplies row by row; the codes as bf16 through the bf16
            # matrix product are 2-3x faster at 128 rows, and the scales then multiply the outputs
            # (the kernel also crashes on widths that are not a multiple of 16).
            return (F.linear(rows, self.codes().to(rows.dtype)).float() * self.scale.float()).to(rows.dtype)
        # PyTorch's kernel wants the codes in rows: made once and kept (twice the codes' memory),
        # as every generated token comes here.
        if self._kernel_weight is None:
            self._kernel_weight = self.codes().contiguous()
        return torch._weight_int8pack_mm(rows, self._kernel_weight, self.scale)


class Int4Linear(QuantizedLinear):
    """``nn.Linear`` with 4-bit weights: groups of ``group_size`` along each row, each group with
    its own scale and zero. Two weights are packed per byte."""

    GROUP_SIZES = (32, 64, 128, 256)  # what PyTorch's int4 kernel supports

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 32, device=None):
        if group_size not in self.GROUP_SIZES or in_features % group_size:
            raise UserError(f"int4 needs layers whose input size is a multiple of the group size "
                            f"({', '.join(map(str, self.GROUP_SIZES))}); this one has {in_features} "
                            f"inputs and group size {group_size}: use int8, or a group size that divides it")
        super().__init__(in_features, out_features, bias, device)
        self.group_size = group_size
        groups, tiles = in_features // group_size, -(-out_features // TILE_ROWS)
        # Two weights per byte, in tiles of 16 rows, in the order the fast decoding step reads them
        # (see pack_codes); the scales and zeros as (tiles, groups, 16 rows) to match. codes(),
        # scales() and zeros() give them back row by row.
        self.register_buffer("weight", torch.zeros(tiles * TILE_ROWS, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(tiles, groups, TILE_ROWS, dtype=torch.bfloat16, device=device))
        self.register_buffer("zero", torch.zeros(tiles, groups, TILE_ROWS, dtype=torch.bfloat16, device=device))
        # PyTorch's CPU kernel's own arrangement of the same numbers, made at its first use (where
        # the compiled extension is missing: see _kernel).
        self.register_buffer("_kernel_weight", None, persistent=False)
        self.register_buffer("_kernel_scale_zero", None, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> Int4Linear:
        w = linear.weight.detach().float()
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, device=w.device)
        groups = w.view(q.out_features, -1, group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        # Scale and zero are rounded to bf16 first (the kernel reads them in bf16), and the
        # codes are chosen against those rounded values.
        scale = ((high - low) / 15).clamp(min=1e-12).to(torch.bfloat16)
        zero = (low + 8 * scale.float()).to(torch.bfloat16)
        codes = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
        q.weight.copy_(pack_codes(codes.to(torch.uint8).view(q.out_features, q.in_features)))
        q.scale.copy_(_in_tiles(scale))
        q.zero.copy_(_in_tiles(zero))
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach().float())
        return q

    def codes(self) -> torch.Tensor:
        """The 4-bit numbers, one per weight, as a ``(out, in)`` uint8 tensor."""
        return unpack_codes(self.weight)[: self.out_features]

    def scales(self) -> torch.Tensor:
        """Each group's scale, ``(out, groups)``."""
        return _by_row(self.scale)[: self.out_features]

    def zeros(self) -> torch.Tensor:
        """Each group's zero, ``(out, groups)``."""
        return _by_row(self.zero)[: self.out_features]

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight matrix the codes stand for: ``(q - 8) * scale + zero``, group by group."""
        q = self.codes().to(dtype).view(self.out_features, -1, self.group_size)
        w = (q - 8) * self.scales().to(dtype)[..., None] + self.zeros().to(dtype)[..., None]
        return w.view(self.out_features, self.in_features)

    def _kernel(self, rows: torch.Tensor) -> torch.Tensor:
        if (native := extension()) is not None:
            # The bf16 matrix product over the weight the codes stand for, a chunk of rows at a
            # time in the compiled extension: for a prompt's pass 2-3x PyTorch's int4 kernel at
            # 128 rows. The fast decoding step decodes, so only prompts come here, and a short one
            # too: PyTorch's kernel needs its own arrangement of the codes, seconds to make for a
            # 1B model (the first prompt waited for it) and a second copy to keep.
            return native.quantized_matmul(rows, self.weight, self.scale, self.zero, self.group_size,
                                           self.in_features, self.out_features)
        if self._kernel_weight is None:
            # The kernel wants the output size in multiples of 16 (padded with zero rows, whose
            # outputs are cut off again) and the scales and zeros as (groups, out, 2).
            pad = -self.out_features % 16
            codes = F.pad(self.codes().to(torch.int32), (0, 0, 0, pad))
            self._kernel_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            scale_zero = F.pad(torch.stack([self.scales(), self.zeros()], dim=-1), (0, 0, 0, 0, 0, pad))
            self._kernel_scale_zero = scale_zero.transpose(0, 1).contiguous()
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self._kernel_weight, self.group_size,
                                                          self._kernel_scale_zero)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """``(out, in)`` 4-bit codes, two per byte, in tiles of 16 rows (the last filled with zero rows):
    ``(out`` rounded up to 16``, in / 2)`` bytes.

    Within a row, each 64 inputs are 32 bytes, byte ``i`` holding input ``i`` in its low 4 bits and
    input ``i + 32`` in its high 4 bits (a last 32 inputs: 16 bytes, inputs ``i`` and ``i + 16``).
    A tile stores each 64 inputs as 8 runs of 64 bytes, run ``j`` holding bytes ``4j .. 4j + 3`` of
    its 16 rows in turn: the low halves of a run are then the 16 rows' codes for 4 consecutive
    inputs, which the fast decoding step multiplies in one instruction (fast_decode_kernels.h).
    """
    out, n = codes.shape
    full = n // 64 * 64
    codes = F.pad(codes, (0, 0, 0, -out % TILE_ROWS))
    tiles = codes.shape[0] // TILE_ROWS
    halves = codes[:, :full].reshape(codes.shape[0], full // 64, 2, 32)
    row_bytes = halves[:, :, 0] | (halves[:, :, 1] << 4)  # (rows, 64-input blocks, 32)
    parts = [row_bytes.reshape(tiles, TILE_ROWS, full // 64, 8, 4).permute(0, 2, 3, 1, 4).reshape(tiles, -1)]
    if n > full:
        tail = codes[:, full:].reshape(-1, 2, 16)
        tail_bytes = tail[:, 0] | (tail[:, 1] << 4)  # (rows, 16)
        parts.append(tail_bytes.reshape(tiles, TILE_ROWS, 4, 4).permute(0, 2, 1, 3).reshape(tiles, -1))
    return torch.cat(parts, dim=1).reshape(tiles * TILE_ROWS, n // 2)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """The codes ``pack_codes`` packed, ``(rows, in)`` with the last tile's filling rows."""
    rows, n = packed.shape[0], packed.shape[1] * 2
    full, tiles = n // 64 * 64, rows // TILE_ROWS
    flat = packed.reshape(tiles, -1)
    runs = flat[:, : full * 8].reshape(tiles, full // 64, 8, TILE_ROWS, 4).permute(0, 3, 1, 2, 4)
    row_bytes = runs.reshape(rows, full // 64, 1, 32)
    parts = [torch.cat([row_bytes & 15, row_bytes >> 4], dim=2).reshape(rows, full)]
    if n > full:
        tail = flat[:, full * 8 :].reshape(tiles, 4, TILE_ROWS, 4).permute(0, 2, 1, 3).reshape(rows, 16)
        parts.append(torch.cat([tail & 15, tail >> 4], dim=1))
    return torch.cat(parts, dim=1)


def int8_in_tiles(codes: torch.Tensor) -> torch.Tensor:
    """``(out, in)`` int8 codes in tiles of 16 rows, as the fast decoding step reads them: the
    inputs padded with zeros to a multiple of 32 and the rows to a multiple of 16, and each tile
    stored 4 inputs at a time, 4 bytes of each of its 16 rows in turn (fast_decode_kernels.h)."""
    padded = F.pad(codes, (0, -codes.shape[1] % INPUT_BLOCK, 0, -codes.shape[0] % TILE_ROWS))
    rows, width = padded.shape
    return padded.view(-1, TILE_ROWS, width // 4, 4).transpose(1, 2).reshape(rows, width)


def int8_by_row(tiled: torch.Tensor) -> torch.Tensor:
    """The codes ``int8_in_tiles`` arranged, row by row (with its padding)."""
    rows, width = tiled.shape
    return tiled.view(-1, width // 4, TILE_ROWS, 4).transpose(1, 2).reshape(rows, width)


def _in_tiles(per_row: torch.Tensor) -> torch.Tensor:
    """``(out, groups)`` -> ``(tiles, groups, 16)``, the last tile filled with zeros."""
    padded = F.pad(per_row, (0, 0, 0, -per_row.shape[0] % TILE_ROWS))
    return padded.view(-1, TILE_ROWS, per_row.shape[1]).transpose(1, 2).contiguous()


def _by_row(tiled: torch.Tensor) -> torch.Tensor:
    """``(tiles, groups, 16)`` -> ``(tiles * 16, groups)``."""
    return tiled.transpose(1, 2).reshape(-1, tiled.shape[1])


SCHEMES = ("int8", "int4")


def quantize(model: nn.Module, scheme: str = "int8", group_size: int = 32) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` with its ``scheme`` form, in place; returns ``model``.

    ``scheme``: "int8" (per-row scales) or "int4" (``group_size`` weights per scale and zero).
    With tied embeddings the output head gets its own quantized copy while the token embedding
    stays as it was (a lookup reads one row per token, so its size costs no speed).
    """
    if scheme == "int8":
        convert = Int8Linear.from_linear
    elif scheme == "int4":
        convert = partial(Int4Linear.from_linear, group_size=group_size)
    else:
        raise UserError(f"unknown quantization {scheme!r}; choose one of: {', '.join(SCHEMES)}")
    linears = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear]  # not subclasses, whose forward may do more
    if not linears:
        raise UserError("the model has no nn.Linear layers to quantize (was it quantized already?)")
    converted = [convert(child) for _, _, child in linears]  # all checked before any is replaced
    for (parent, name, _), new in zip(linears, converted):
        setattr(parent, name, new)
    return model.eval()


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def refuse_quantized(model: nn.Module, action: str) -> None:
    """Raise ``UserError`` if ``model`` holds int8 layers: ``action`` needs the full-precision weights."""
    if is_quantized(model):
        raise UserError(f"cannot {action} a quantized model: {action} the full-precision model and "
                        "quantize it again after loading (it takes a second)")
