"""Weight-only quantization of stacked expert weights into com.microsoft.QMoE's int8 / int4 layout.

The layout, measured with onnxruntime 1.32's CPU kernel (docs/onnx.md): a weight (E, N, K) in
nn.Linear's orientation (N outputs, K inputs, K contiguous) is stored as uint8 (E, N, K * bits / 8);
a code u means (u - 2^(bits-1)) * scale[e, n], the zero point 128 (int8) or 8 (int4) being implied;
int4 puts element 2j in the low nibble of byte j and element 2j+1 in the high nibble. Scales are
per output channel, (E, N). Quantization is symmetric: the largest |w| of a channel maps to the
largest code (127 or 7); -128 and -8 are never used, so positive and negative weights round alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BITS = {"int8": 8, "int4": 4}


@dataclass(frozen=True, eq=False)
class Quantized:
    """One stacked weight as the graph holds it: packed codes and per-output-channel scales."""

    bits: int
    packed: np.ndarray  # uint8 (E, N, K * bits / 8)
    scales: np.ndarray  # (E, N), in the model's dtype

    def dequantized(self) -> torch.Tensor:
        """(E, N, K) in the scales' dtype: the weight the kernel computes with, for the exact parity
        check. Computed on demand, so that an export does not hold a second float copy of the experts."""
        codes = torch.from_numpy(unpack(self.packed, self.bits).astype(np.float32)) - 2 ** (self.bits - 1)
        scales = torch.from_numpy(self.scales)
        return (codes * scales.float()[..., None]).to(scales.dtype)


def quantize(weight: torch.Tensor, bits: int) -> Quantized:
    """Symmetric per-output-channel quantization of `weight` (E, N, K), K the input axis."""
    w = weight.detach().float().cpu()
    top = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=-1) / top  # (E, N)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero channel: codes 0, scale 0
    codes = torch.round(w / safe[..., None]).clamp(-top, top).to(torch.int32)
    unsigned = (codes + 2 ** (bits - 1)).to(torch.uint8).numpy()
    return Quantized(bits, pack(unsigned, bits), scale.to(weight.dtype).numpy())


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes (..., K) -> bytes (..., K * bits / 8): int4 takes two per byte, low nibble first."""
    if bits == 8:
        return np.ascontiguousarray(codes)
    if codes.shape[-1] % 2:
        raise ValueError("int4 packing needs an even number of input features")
    return np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4))


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of pack(): uint8 codes (..., K)."""
    if bits == 8:
        return packed
    out = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 0x0F, packed >> 4
    return out

