from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TextKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TEXT_KIND_UNSPECIFIED: _ClassVar[TextKind]
    QUERY: _ClassVar[TextKind]
    PASSAGE: _ClassVar[TextKind]

class VectorEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FLOAT_LIST: _ClassVar[VectorEncoding]
    RAW_FLOAT32: _ClassVar[VectorEncoding]
TEXT_KIND_UNSPECIFIED: TextKind
QUERY: TextKind
PASSAGE: TextKind
FLOAT_LIST: VectorEncoding
RAW_FLOAT32: VectorEncoding

class EmbedRequest(_message.Message):
    __slots__ = ("texts", "model", "model_version", "kind", "truncate", "normalize", "encoding")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    model: str
    model_version: str
    kind: TextKind
    truncate: bool
    normalize: bool
    encoding: VectorEncoding
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., kind: _Optional[_Union[TextKind, str]] = ..., truncate: _Optional[bool] = ..., normalize: _Optional[bool] = ..., encoding: _Optional[_Union[VectorEncoding, str]] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "raw_float32", "dim", "token_counts", "truncated", "model", "model_version", "total_tokens")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    RAW_FLOAT32_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNTS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    raw_float32: bytes
    dim: int
    token_counts: _containers.RepeatedScalarFieldContainer[int]
    truncated: _containers.RepeatedScalarFieldContainer[bool]
    model: str
    model_version: str
    total_tokens: int
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., raw_float32: _Optional[bytes] = ..., dim: _Optional[int] = ..., token_counts: _Optional[_Iterable[int]] = ..., truncated: _Optional[_Iterable[bool]] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., total_tokens: _Optional[int] = ...) -> None: ...

class EmbedStreamResponse(_message.Message):
    __slots__ = ("sequence", "response", "code", "message")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    response: EmbedResponse
    code: int
    message: str
    def __init__(self, sequence: _Optional[int] = ..., response: _Optional[_Union[EmbedResponse, _Mapping]] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...
