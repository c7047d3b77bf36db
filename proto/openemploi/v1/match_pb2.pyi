from openemploi.v1 import index_pb2 as _index_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MatchOccupationRequest(_message.Message):
    __slots__ = ("text", "k")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    text: str
    k: int
    def __init__(self, text: _Optional[str] = ..., k: _Optional[int] = ...) -> None: ...

class OccupationMatch(_message.Message):
    __slots__ = ("code", "label", "score", "dense_score", "lexical_score", "matched_terms", "matched_entry", "sectors")
    CODE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DENSE_SCORE_FIELD_NUMBER: _ClassVar[int]
    LEXICAL_SCORE_FIELD_NUMBER: _ClassVar[int]
    MATCHED_TERMS_FIELD_NUMBER: _ClassVar[int]
    MATCHED_ENTRY_FIELD_NUMBER: _ClassVar[int]
    SECTORS_FIELD_NUMBER: _ClassVar[int]
    code: str
    label: str
    score: float
    dense_score: float
    lexical_score: float
    matched_terms: _containers.RepeatedScalarFieldContainer[str]
    matched_entry: str
    sectors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, code: _Optional[str] = ..., label: _Optional[str] = ..., score: _Optional[float] = ..., dense_score: _Optional[float] = ..., lexical_score: _Optional[float] = ..., matched_terms: _Optional[_Iterable[str]] = ..., matched_entry: _Optional[str] = ..., sectors: _Optional[_Iterable[str]] = ...) -> None: ...

class MatchOccupationResponse(_message.Message):
    __slots__ = ("matches", "model", "model_version")
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    matches: _containers.RepeatedCompositeFieldContainer[OccupationMatch]
    model: str
    model_version: str
    def __init__(self, matches: _Optional[_Iterable[_Union[OccupationMatch, _Mapping]]] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class MatchProfileRequest(_message.Message):
    __slots__ = ("collection", "text", "skills", "k", "filters", "skill_weight")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SKILLS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    SKILL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    collection: str
    text: str
    skills: _containers.RepeatedScalarFieldContainer[str]
    k: int
    filters: _containers.RepeatedCompositeFieldContainer[_index_pb2.Filter]
    skill_weight: float
    def __init__(self, collection: _Optional[str] = ..., text: _Optional[str] = ..., skills: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ..., filters: _Optional[_Iterable[_Union[_index_pb2.Filter, _Mapping]]] = ..., skill_weight: _Optional[float] = ...) -> None: ...

class ProfileMatch(_message.Message):
    __slots__ = ("id", "score", "dense_score", "skill_score", "matched_skills", "missing_skills", "text", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DENSE_SCORE_FIELD_NUMBER: _ClassVar[int]
    SKILL_SCORE_FIELD_NUMBER: _ClassVar[int]
    MATCHED_SKILLS_FIELD_NUMBER: _ClassVar[int]
    MISSING_SKILLS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    dense_score: float
    skill_score: float
    matched_skills: _containers.RepeatedScalarFieldContainer[str]
    missing_skills: _containers.RepeatedScalarFieldContainer[str]
    text: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., dense_score: _Optional[float] = ..., skill_score: _Optional[float] = ..., matched_skills: _Optional[_Iterable[str]] = ..., missing_skills: _Optional[_Iterable[str]] = ..., text: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class MatchProfileResponse(_message.Message):
    __slots__ = ("matches",)
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    matches: _containers.RepeatedCompositeFieldContainer[ProfileMatch]
    def __init__(self, matches: _Optional[_Iterable[_Union[ProfileMatch, _Mapping]]] = ...) -> None: ...
