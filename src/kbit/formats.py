"""Code maps (quantization tables) for k-bit formats.

The 4-bit tables and layout constants come from the native module, which takes them from
``csrc/formats.h`` — their single definition. The 8-bit maps are generated here by the documented
algorithms; ``create_dynamic_map()`` reproduces bitsandbytes' default map bit for bit (its sha256 is
checked by the tests), so 8-bit states and statistics are interchangeable with bitsandbytes.
"""

from __future__ import annotations

import itertools
import math

import torch

from ._native import _C

__all__ = [
    "create_dynamic_map",
    "create_normal_map",
    "create_fp8_map",
    "create_linear_map",
    "get_4bit_type",
    "QUANT_TYPES_4BIT",
    "BLOCKSIZES_4BIT",
    "NESTED_BLOCKSIZE_4BIT",
]

_TABLES = _C.format_tables()

#: The 4-bit data types, as accepted by ``quant_type``.
QUANT_TYPES_4BIT = ("fp4", "nf4")
#: Block sizes 4-bit quantization accepts.
BLOCKSIZES_4BIT = tuple(_TABLES["blocksizes_4bit"])
#: Block size double quantization uses for the 4-bit absmax.
NESTED_BLOCKSIZE_4BIT = int(_TABLES["nested_blocksize_4bit"])
#: Bits of the high nibble shift (Note [nibble order] in csrc/formats.h).
HIGH_NIBBLE_SHIFT = int(_TABLES["high_nibble_shift"])
CODE_SIZE_8BIT = int(_TABLES["code_size_8bit"])
#: Block size of blockwise 8-bit optimizer states.
OPTIMIZER_BLOCKSIZE_8BIT = int(_TABLES["optimizer_blocksize_8bit"])
#: Block size of 4-bit optimizer states, and their 16-value code maps (Note [4-bit optimizer states]):
#: first moments use the signed dynamic-exponent map, second moments the unsigned map without zero.
OPTIMIZER_BLOCKSIZE_4BIT = int(_TABLES["optimizer_blocksize_4bit"])
OPTIMIZER_4BIT_SIGNED_MAP = tuple(_TABLES["optimizer_4bit_signed_map"])
OPTIMIZER_4BIT_UNSIGNED_MAP = tuple(_TABLES["optimizer_4bit_unsigned_map"])

NF4_VALUES = tuple(_TABLES["nf4"])
FP4_VALUES = tuple(_TABLES["fp4"])
FP4_THRESHOLDS = tuple(_TABLES["fp4_thresholds"])
FP4_MAGNITUDE_CODE = tuple(_TABLES["fp4_magnitude_code"])
FP4_SIGN_BIT = int(_TABLES["fp4_sign_bit"])

#: QLoRA's NF4 offset: 1 - (1/30 + 1/32) / 2, the largest quantile's probability.
NF4_OFFSET = 0.9677083


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """Dynamic (tree) quantization map of Dettmers et al., "8-bit Optimizers via Block-wise Quantization".

    Each value is ``10**e * f`` for an exponent ``e`` (``max_exponent_bits`` decades below 1) and a
    linear fraction ``f`` in (0.1, 1), plus 0 and 1. With the defaults the result is bitsandbytes'
    ``"dynamic"`` map (``signed=False``: its ``"udynamic"`` map for Adam's second moment). An unsigned map
    needs ``max_exponent_bits == total_bits - 1`` (only then does the construction give ``2**total_bits``
    values; bitsandbytes stops on an assertion otherwise): others raise ``ValueError``.

    Returns:
        float32 tensor of 256 sorted values in [-1, 1].
    """
    if total_bits > 8 or total_bits < 2:
        raise ValueError(f"total_bits must be between 2 and 8 (got {total_bits})")
    non_sign_bits = total_bits - (1 if signed else 0)
    if max_exponent_bits > non_sign_bits:
        raise ValueError(
            f"max_exponent_bits ({max_exponent_bits}) cannot exceed the {non_sign_bits} non-sign bits of a "
            f"{total_bits}-bit {'signed' if signed else 'unsigned'} map"
        )
    if not signed and max_exponent_bits != total_bits - 1:
        # bitsandbytes' construction (kept for identical maps) fills exactly 2**total_bits entries of an
        # unsigned map only then; bitsandbytes itself stops on an assertion for the others.
        raise ValueError(
            f"an unsigned dynamic map needs max_exponent_bits = total_bits - 1 = {total_bits - 1} "
            f"(got {max_exponent_bits}: the construction would not give {2**total_bits} values); "
            "use signed=True for other exponent widths"
        )
    # bitsandbytes counts the non-sign bits as total_bits - 1 for both signs; kept for identical maps.
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    data: list[float] = []
    for i in range(max_exponent_bits):
        fraction_items = (
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        )
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    if len(data) != 2**total_bits:
        raise ValueError(f"internal error: dynamic map has {len(data)} entries, expected {2**total_bits}")
    data += [0] * (CODE_SIZE_8BIT - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def _norm_ppf(p: float) -> float:
    """Inverse standard normal CDF to double precision (Acklam's rational approximation refined by a
    Halley step on ``erfc``), so that ``create_normal_map`` needs no scipy."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {p}")
    a = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02, 1.383577518672690e02,
         -3.066479806614716e01, 2.506628277459239e00)
    b = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01,
         -1.328068155288572e01)
    c = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00, -2.549732539343734e00,
         4.374664141464968e00, 2.938163982698783e00)
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)
    p_low = 0.02425
    if p < p_low:
        q = math.sqrt(-2 * math.log(p))
        x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / (
            (((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1)
    elif p <= 1 - p_low:
        q = p - 0.5
        r = q * q
        x = (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q / (
            ((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)
    else:
        q = math.sqrt(-2 * math.log(1 - p))
        x = -(((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / (
            (((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1)
    for _ in range(2):  # Halley refinement: cubic convergence from ~1e-9 to full double precision
        e = 0.5 * math.erfc(-x / math.sqrt(2)) - p
        u = e * math.sqrt(2 * math.pi) * math.exp(x * x / 2)
        x = x - u / (1 + x * u / 2)
    return x


def create_normal_map(offset: float = NF4_OFFSET, use_extra_value: bool = True) -> torch.Tensor:
    """The NormalFloat map of QLoRA (Dettmers et al. 2023), as 256 sorted float32 values.

    Quantiles of N(0, 1) at evenly spaced probabilities from ``offset`` to 0.5 on each side, normalized to
    [-1, 1]. With ``use_extra_value=True`` the positive side gets one more level (8 positive, 7 negative and
    an exact zero: the 16 NF4 values); the remaining entries are zeros. Unlike bitsandbytes this needs no scipy.
    """
    if not 0.5 < offset < 1.0:
        raise ValueError(f"offset must be in (0.5, 1), got {offset}")
    positives = 9 if use_extra_value else 8
    v1 = [_norm_ppf(p) for p in torch.linspace(offset, 0.5, positives, dtype=torch.float32)[:-1].tolist()]
    v3 = [-_norm_ppf(p) for p in torch.linspace(offset, 0.5, 8, dtype=torch.float32)[:-1].tolist()]
    v2 = [0.0] * (CODE_SIZE_8BIT - len(v1) - len(v3))
    values = torch.tensor(v1 + v2 + v3, dtype=torch.float32).sort().values
    return values / values.max()


def create_fp8_map(signed: bool = True, exponent_bits: int = 5, precision_bits: int = 2, total_bits: int = 8) -> torch.Tensor:
    """A float map with ``exponent_bits`` exponent and ``precision_bits`` mantissa bits (subnormals
    included), normalized to max 1, sorted, padded with zeros to 256 entries."""
    if exponent_bits + precision_bits != total_bits - (1 if signed else 0):
        raise ValueError(
            f"exponent_bits + precision_bits must equal total_bits{' - 1 (sign)' if signed else ''}: "
            f"{exponent_bits} + {precision_bits} != {total_bits - (1 if signed else 0)}"
        )
    if not 2 <= total_bits <= 8:
        raise ValueError(f"total_bits must be between 2 and 8 (got {total_bits})")
    bias = 2 ** (exponent_bits - 1)
    values: list[float] = []
    for evalue in range(2**exponent_bits):
        for bits in itertools.product([0, 1], repeat=precision_bits):
            value = 1 if evalue != 0 else 0
            for i, bit in enumerate(bits):
                value += bit * 2 ** -(i + 1)
            value *= 2**-bias if evalue == 0 else 2 ** -(evalue - bias - 1)
            values.append(value)
            if signed:
                values.append(-value)
    values.sort()
    values += [0.0] * (CODE_SIZE_8BIT - len(values))
    values.sort()
    code = torch.tensor(values, dtype=torch.float32)
    return code / code.max()


def create_linear_map(signed: bool = True, total_bits: int = 8, add_zero: bool = True) -> torch.Tensor:
    """Evenly spaced values in [-1, 1] (or [0, 1] unsigned), padded with zeros in the middle to 256."""
    if not 1 <= total_bits <= 8:
        raise ValueError(f"total_bits must be between 1 and 8 (got {total_bits})")
    sign = -1.0 if signed else 0.0
    total_values = 2**total_bits
    if add_zero or total_bits < 8:
        # With an odd count an exact zero is part of the grid.
        total_values = 2**total_bits if not signed else 2**total_bits - 1
    values = torch.linspace(sign, 1.0, total_values)
    gap = CODE_SIZE_8BIT - values.numel()
    if gap == 0:
        return values
    half = values.numel() // 2
    return torch.tensor(values[:half].tolist() + [0] * gap + values[half:].tolist(), dtype=torch.float32)


# The 16 values of each 4-bit type, by code. "int4" is bitsandbytes' symmetric -7..7 list, which its own
# get_4bit_type cannot build (it divides an int64 tensor in place).
_TABLES_4BIT = {
    "nf4": NF4_VALUES,
    "fp4": FP4_VALUES,
    "int4": tuple(v / 7.0 for v in (7, 6, 5, 4, 3, 2, 1, 0, -0.0, -1, -2, -3, -4, -5, -6, -7)),
}


def get_4bit_type(typename: str, device=None, blocksize: int = 64) -> torch.Tensor:
    """The 16 values of a 4-bit type, indexed by code: ``"nf4"`` (sorted), ``"fp4"`` (sign in bit 3) or
    ``"int4"``. ``device`` defaults to the CPU (bitsandbytes defaults to CUDA). ``blocksize`` is accepted
    for signature compatibility and does not change the table."""
    if not isinstance(typename, str):
        raise TypeError(f"typename must be a string such as 'nf4', got {type(typename).__name__}")
    if typename not in _TABLES_4BIT:
        raise ValueError(f"unknown 4-bit type {typename!r}: choose one of {', '.join(map(repr, _TABLES_4BIT))}")
    return torch.tensor(_TABLES_4BIT[typename], dtype=torch.float32, device=device)
