"""GGUF tensor types: the one place that maps a type to its block layout and byte size.

Block sizes come from the `gguf` package (GGML_QUANT_SIZES), which mirrors ggml's type traits.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from autosquash.errors import AutosquashError

# The types a plan may choose for a weight matrix, from most to fewest bits.
SEARCHABLE_TYPES: tuple[str, ...] = (
    "F16",
    "Q8_0",
    "Q6_K",
    "Q5_1",
    "Q5_K",
    "Q5_0",
    "Q4_1",
    "Q4_K",
    "Q4_0",
    "IQ4_NL",
    "IQ4_XS",
    "Q3_K",
    "IQ3_S",
    "IQ3_XXS",
    "Q2_K",
    "IQ2_S",
    "IQ2_XS",
    "IQ2_XXS",
    "TQ2_0",
    "TQ1_0",
)

# What llama.cpp's quantize (llama-quant.cpp, llama-cpp-python 0.3.36) stores when a row is not a multiple of
# the asked type's block length (tensor_type_fallback: every IQ type on 256-value super-blocks takes IQ4_NL).
LLAMA_CPP_FALLBACK: dict[str, str] = {
    "Q2_K": "Q4_0",
    "Q3_K": "Q4_0",
    "IQ4_XS": "IQ4_NL",
    "IQ3_S": "IQ4_NL",
    "IQ3_XXS": "IQ4_NL",
    "IQ2_S": "IQ4_NL",
    "IQ2_XS": "IQ4_NL",
    "IQ2_XXS": "IQ4_NL",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
    "TQ1_0": "Q4_0",
    "TQ2_0": "Q4_0",
}

# What autosquash stores instead: llama.cpp's, except that Q2_K and Q3_K take IQ4_NL, the same 4.5 bits per
# weight as Q4_0 at about half its KL on SmolLM2 (benchmarks/results/iq4_vs_q4_0.txt).
FALLBACK: dict[str, str] = {**LLAMA_CPP_FALLBACK, "Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL"}


class UnknownTypeError(AutosquashError, ValueError):
    """A type name GGUF does not define (a ValueError too, so file validators report it per field)."""


@dataclass(frozen=True)
class TensorType:
    """A GGUF tensor type: `block_size` values stored in `block_bytes` bytes."""

    name: str
    block_size: int
    block_bytes: int

    @property
    def bits_per_weight(self) -> float:
        """Bits a stored value takes on average, scales included."""
        return 8.0 * self.block_bytes / self.block_size

    def fits_row(self, row_length: int) -> bool:
        """Whether a row of `row_length` values splits into whole blocks of this type."""
        return row_length % self.block_size == 0

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Exact bytes of a tensor of `shape` (rows along the last dimension) in this type."""
        n = 1
        for d in shape:
            n *= d
        if not self.fits_row(shape[-1]):
            raise AutosquashError(f"a row of {shape[-1]} values is not a whole number of {self.name} blocks")
        return n // self.block_size * self.block_bytes


def tensor_type(name: str) -> TensorType:
    """Look a GGUF type up by name (case-insensitive), e.g. 'q4_k' or 'Q4_K'."""
    key = name.upper()
    try:
        ggml = GGMLQuantizationType[key]
    except KeyError:
        raise UnknownTypeError(
            f"unknown GGUF tensor type {name!r}; expected one of {', '.join(SEARCHABLE_TYPES)}, F32"
        ) from None
    block_size, block_bytes = GGML_QUANT_SIZES[ggml]
    return TensorType(key, block_size, block_bytes)


def searchable_type(name: str) -> str:
    """The canonical name of a type a plan may choose (SEARCHABLE_TYPES); a ValueError for any other."""
    canonical = tensor_type(name).name
    if canonical not in SEARCHABLE_TYPES:
        raise ValueError(f"{canonical} is not a searchable type; expected one of {', '.join(SEARCHABLE_TYPES)}")
    return canonical


def legal_type(name: str, row_length: int, llama_cpp: bool = False) -> str:
    """The type a row of `row_length` values is stored in when `name` is asked for.

    Returns `name` itself when legal, else its fallback: `FALLBACK`, or `LLAMA_CPP_FALLBACK` with `llama_cpp`
    (to reproduce a file llama.cpp's quantize writes).
    """
    t = tensor_type(name)
    if t.fits_row(row_length):
        return t.name
    fallback = (LLAMA_CPP_FALLBACK if llama_cpp else FALLBACK).get(t.name)
    if fallback is None or not tensor_type(fallback).fits_row(row_length):
        raise AutosquashError(f"no legal GGUF type for a row of {row_length} values (asked for {t.name})")
    return fallback


def legal_type_or_f16(name: str, row_length: int) -> str:
    """`legal_type`, or F16 for rows no quantized type fits (short Kronecker factor rows, say)."""
    try:
        return legal_type(name, row_length)
    except AutosquashError:
        return "F16"
