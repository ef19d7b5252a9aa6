"""n-bit quantization formats for rwkv-edge (pure numpy reference).

Public API:
  pack_bits, unpack_bits, SUPPORTED_BITS       -- uint8 bit packing along columns
  QuantizedMatrix, quantize, dequantize         -- 1/2/4/8-bit affine, per-row or per-group
  quantize_int8_rows, dequantize_int8_rows      -- symmetric int8 per-row weight storage
  quantize_q4, dequantize_q4, pack_q4, unpack_q4 -- group-wise symmetric int4 (groups of 32, float16 scales)
"""

from .formats import FORMAT_VERSION, QuantizedMatrix, dequantize, quantize
from .int8 import dequantize_int8_rows, quantize_int8_rows
from .q4 import dequantize_q4, pack_q4, quantize_q4, unpack_q4
from .packing import SUPPORTED_BITS, pack_bits, unpack_bits

__all__ = [
    "FORMAT_VERSION",
    "QuantizedMatrix",
    "SUPPORTED_BITS",
    "dequantize",
    "dequantize_int8_rows",
    "dequantize_q4",
    "pack_q4",
    "quantize_q4",
    "unpack_q4",
    "pack_bits",
    "quantize",
    "quantize_int8_rows",
    "unpack_bits",
]
