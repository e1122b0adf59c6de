"""GGUF files: reading keys and tensors, the q/k row layout, and writing a file in ggml's order.

Tensors are decoded by autosquash's own dequantizer (the arithmetic a trial evaluates). What a file's keys mean
for each model family is models.gguf_family's business; this module knows the format only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFType, GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from autosquash.errors import AutosquashError
from autosquash.files import atomic_path
from autosquash.formats.codecs import QUANTIZABLE_TYPES, QuantizedTensor, dequantize

# GGUF's fixed-size value types as little-endian struct formats; strings and arrays are read apart.
_SCALARS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
READABLE_VERSIONS = (2, 3)


@dataclasses.dataclass(frozen=True)
class Field:
    """A key's value as Python values (an array as a list), its GGUF type and, for an array, its items'."""

    value: Any
    types: tuple[GGUFValueType, ...]  # (type,) or (ARRAY, item type), as the gguf package lists them

    def contents(self) -> Any:
        return self.value


@dataclasses.dataclass(frozen=True)
class Tensor:
    """A tensor as stored: its name, ggml shape (the row length first), type and bytes (uint8, one row of
    blocks per line), a view of the mapped file."""

    name: str
    shape: tuple[int, ...]
    tensor_type: GGMLQuantizationType
    data: np.ndarray

    @property
    def n_bytes(self) -> int:
        return int(self.data.nbytes)


class GGUFFile:
    """A GGUF file's keys and tensors (mapped, not read). The gguf package's reader takes seconds on a
    tokenizer's vocabulary (SmolLM2's 49,152 tokens and 48,900 merges: 4.5 s on 2 cores), this one about 0.1 s: an
    array of numbers is one numpy view, an array of strings one loop over the header's bytes.
    Little-endian files of versions 2 and 3 (those llama.cpp and the gguf package write)."""

    def __init__(self, path: str | Path):
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = self._map
        if buf[:4] != b"GGUF":
            raise ValueError("no GGUF magic")
        (version,) = _U32.unpack_from(buf, 4)
        if version not in READABLE_VERSIONS:
            swapped = struct.unpack(">I", buf[4:8])[0]
            if swapped in READABLE_VERSIONS:
                raise AutosquashError(f"{path} is a big-endian GGUF file; autosquash reads little-endian ones")
            raise AutosquashError(f"{path}: GGUF version {version}; autosquash reads versions 2 and 3")
        n_tensors, n_fields = struct.unpack_from("<QQ", buf, 8)
        self._off = 24
        self.fields: dict[str, Field] = {}
        for _ in range(n_fields):
            key = self._string()
            vtype = GGUFValueType(self._u32())
            if vtype == GGUFValueType.ARRAY:
                item = GGUFValueType(self._u32())
                self.fields[key] = Field(self._array(item, self._u64()), (vtype, item))
            else:
                self.fields[key] = Field(self._value(vtype), (vtype,))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            shape = tuple(self._u64() for _ in range(self._u32()))
            infos.append((name, shape, GGMLQuantizationType(self._u32()), self._u64()))
        align = int(self.fields["general.alignment"].value) if "general.alignment" in self.fields else 32
        start = -(-self._off // align) * align
        self.tensors: list[Tensor] = []
        for name, shape, ttype, offset in infos:
            block, type_bytes = GGML_QUANT_SIZES[ttype]
            rows = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
            row_bytes = shape[0] // block * type_bytes
            begin = start + offset
            if shape[0] % block or begin + rows * row_bytes > len(buf):
                raise ValueError(f"tensor {name} ({ttype.name}, {shape}) does not fit the file")
            data = np.frombuffer(buf, dtype=np.uint8, count=rows * row_bytes, offset=begin).reshape(rows, row_bytes)
            self.tensors.append(Tensor(name, shape, ttype, data))

    def _u32(self) -> int:
        (v,) = _U32.unpack_from(self._map, self._off)
        self._off += 4
        return v

    def _u64(self) -> int:
        (v,) = _U64.unpack_from(self._map, self._off)
        self._off += 8
        return v

    def _string(self) -> str:
        n = self._u64()
        end = self._off + n
        if end > len(self._map):
            raise ValueError("a string runs past the end of the file")
        s = self._map[self._off : end].decode("utf-8")
        self._off = end
        return s

    def _value(self, vtype: GGUFValueType) -> Any:
        if vtype == GGUFValueType.STRING:
            return self._string()
        fmt = _SCALARS[vtype]
        (v,) = struct.unpack_from(fmt, self._map, self._off)
        self._off += struct.calcsize(fmt)
        return v

    def _array(self, item: GGUFValueType, n: int) -> list:
        if item == GGUFValueType.STRING:
            return [self._string() for _ in range(n)]
        if item == GGUFValueType.ARRAY:
            raise ValueError("nested arrays")
        dtype = np.dtype(_SCALARS[item].replace("?", "b1"))
        values = np.frombuffer(self._map, dtype=dtype, count=n, offset=self._off)
        self._off += n * dtype.itemsize
        return values.tolist()


def open_gguf(path: str | Path) -> GGUFFile:
    """A GGUF file's keys and tensors; a file of another kind, or a truncated or corrupt one, is a one-line error
    naming it. Parsed once per file version in a process (its path, size, modification time and inode): the
    model's architecture, config, weights, tokenizer and price all read that one parse."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise AutosquashError(f"cannot read {path}: {e.strerror or e}") from None
    return _parsed(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=4)
def _parsed(path: str, size: int, mtime_ns: int, inode: int) -> GGUFFile:
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise AutosquashError(f"{path} is not a GGUF file")
        return GGUFFile(path)
    except OSError as e:
        raise AutosquashError(f"cannot read {path}: {e.strerror or e}") from None
    except (struct.error, ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError) as e:
        raise AutosquashError(f"{path}: a truncated or corrupt GGUF file ({type(e).__name__}: {e})") from None


def gguf_architecture(path: str | Path) -> str:
    """general.architecture of a GGUF file from its first key, without parsing the whole (large) header.

    GGUF writers (the gguf package's, llama.cpp's) put general.architecture first; otherwise the full
    header is read.
    """
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[:4] != b"GGUF" or len(head) < 32:
        raise AutosquashError(f"{path} is not a GGUF file")
    offset = 4 + 4 + 8 + 8  # magic, version, tensor count, key/value count
    (key_len,) = struct.unpack_from("<Q", head, offset)
    key = head[offset + 8 : offset + 8 + key_len]
    offset += 8 + key_len
    if key == b"general.architecture" and len(head) >= offset + 12:
        vtype, value_len = struct.unpack_from("<IQ", head, offset)
        if vtype == GGUFValueType.STRING and len(head) >= offset + 12 + value_len:
            return head[offset + 12 : offset + 12 + value_len].decode()
    field = open_gguf(path).fields.get("general.architecture")
    if field is None:
        raise AutosquashError(f"{path} names no general.architecture")
    return str(field.value)


def read_tensor(t) -> torch.Tensor:
    """A GGUF tensor (`Tensor`) decoded to float32 in numpy (rows, cols) order: by autosquash's
    dequantizer for the types it writes, by the gguf package's for the others (llama.cpp's IQ types, say)."""
    cols = int(t.shape[0])
    rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
    data = np.ascontiguousarray(t.data).view(np.uint8).reshape(rows, -1)
    if t.tensor_type.name in QUANTIZABLE_TYPES:
        w = dequantize(QuantizedTensor(t.tensor_type.name, (rows, cols), data))
    else:
        from gguf.quants import dequantize as gguf_dequantize

        w = torch.from_numpy(gguf_dequantize(data, t.tensor_type).astype(np.float32)).reshape(rows, cols)
    return w.reshape(cols) if len(t.shape) == 1 else w


def gguf_tokens(path: str | Path) -> list[str]:
    """The vocabulary (tokenizer.ggml.tokens) of a GGUF file, in id order."""
    field = open_gguf(path).fields.get("tokenizer.ggml.tokens")
    if field is None:
        raise AutosquashError(f"{path} holds no tokenizer (tokenizer.ggml.tokens)")
    return list(field.contents())


def tokens_match(tokenizer, tokens: list[str]) -> bool:
    """Whether a transformers tokenizer has exactly `tokens` as its vocabulary, id for id."""
    return len(tokenizer) == len(tokens) and tokenizer.convert_ids_to_tokens(list(range(len(tokens)))) == tokens


def rope_permute(rows: np.ndarray, head_dim: int) -> np.ndarray:
    """Reorder q/k rows (one head after another) from Hugging Face's rotate-half layout to GGUF's interleaved
    rotary layout, as llama.cpp's convert_hf_to_gguf.py does; works on rows of quantized bytes too.
    """
    n_heads = rows.shape[0] // head_dim
    return rows.reshape(n_heads, 2, head_dim // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def rope_unpermute(rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of `rope_permute`: GGUF's interleaved q/k rows back in Hugging Face's order."""
    n_heads = rows.shape[0] // head_dim
    return rows.reshape(n_heads, head_dim // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape).contiguous()


@functools.lru_cache(maxsize=4)
def _tokenizer_fields(source: str, size: int, mtime_ns: int) -> tuple:
    """(key, value, type, array item type) of every tokenizer.* field of a GGUF file, read once per file
    version: parsing a 49k-token vocabulary takes seconds."""
    reader = open_gguf(source)
    return tuple(
        (key, field.contents(), field.types[0], field.types[-1])
        for key, field in reader.fields.items()
        if key.startswith("tokenizer.")
    )


def copy_tokenizer(writer: GGUFWriter, source: Path) -> None:
    """Copy every tokenizer.* field of the GGUF file `source` into `writer`."""
    st = source.stat()
    for key, value, vtype, item_type in _tokenizer_fields(str(source.resolve()), st.st_size, st.st_mtime_ns):
        if vtype == GGUFValueType.ARRAY:
            writer.add_key_value(key, value, vtype, sub_type=item_type)
        else:
            writer.add_key_value(key, value, vtype)


def add_tensor(writer: GGUFWriter, name: str, q: QuantizedTensor | np.ndarray, type_name: str | None = None) -> str:
    """Add a tensor as stored: a QuantizedTensor's blocks in its type, or a float array in `type_name`
    (F32 by default); returns the type written."""
    if isinstance(q, QuantizedTensor):
        data, type_name = q.data, q.type
    else:
        data, type_name = np.asarray(q, dtype=np.float32), type_name or "F32"
    writer.add_tensor(name, data, raw_dtype=GGMLQuantizationType[type_name])
    return type_name


@contextlib.contextmanager
def gguf_writer(path: str | Path, arch_name: str, kind: GGUFType = GGUFType.MODEL) -> Iterator[GGUFWriter]:
    """A GGUFWriter for a model (or adapter) of `arch_name`; header, key/values and tensors are written on exit,
    to a temporary file that then replaces `path` (never half a file there)."""
    with atomic_path(path) as tmp:
        writer = GGUFWriter(str(tmp), arch_name)
        writer.add_type(kind)
        try:
            yield writer
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
