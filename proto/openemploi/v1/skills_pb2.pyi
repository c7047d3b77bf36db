from openemploi.v1 import match_pb2 as _match_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExtractSkillsRequest(_message.Message):
    __slots__ = ("text", "k", "min_score")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    text: str
    k: int
    min_score: float
    def __init__(self, text: _Optional[str] = ..., k: _Optional[int] = ..., min_score: _Optional[float] = ...) -> None: ...

class ExtractedSkill(_message.Message):
    __slots__ = ("uri", "label", "score", "evidence", "label_fr")
    URI_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FR_FIELD_NUMBER: _ClassVar[int]
    uri: str
    label: str
    score: float
    evidence: str
    label_fr: str
    def __init__(self, uri: _Optional[str] = ..., label: _Optional[str] = ..., score: _Optional[float] = ..., evidence: _Optional[str] = ..., label_fr: _Optional[str] = ...) -> None: ...

class ExtractSkillsResponse(_message.Message):
    __slots__ = ("skills", "model", "model_version")
    SKILLS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    skills: _containers.RepeatedCompositeFieldContainer[ExtractedSkill]
    model: str
    model_version: str
    def __init__(self, skills: _Optional[_Iterable[_Union[ExtractedSkill, _Mapping]]] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class GetOccupationRequest(_message.Message):
    __slots__ = ("code",)
    CODE_FIELD_NUMBER: _ClassVar[int]
    code: str
    def __init__(self, code: _Optional[str] = ...) -> None: ...

class OccupationSkill(_message.Message):
    __slots__ = ("uri", "label", "score", "specificity", "evidence", "label_fr")
    URI_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SPECIFICITY_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FR_FIELD_NUMBER: _ClassVar[int]
    uri: str
    label: str
    score: float
    specificity: float
    evidence: str
    label_fr: str
    def __init__(self, uri: _Optional[str] = ..., label: _Optional[str] = ..., score: _Optional[float] = ..., specificity: _Optional[float] = ..., evidence: _Optional[str] = ..., label_fr: _Optional[str] = ...) -> None: ...

class GetOccupationResponse(_message.Message):
    __slots__ = ("code", "label", "sectors", "titles", "tasks", "skills")
    CODE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SECTORS_FIELD_NUMBER: _ClassVar[int]
    TITLES_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    SKILLS_FIELD_NUMBER: _ClassVar[int]
    code: str
    label: str
    sectors: _containers.RepeatedScalarFieldContainer[str]
    titles: _containers.RepeatedScalarFieldContainer[str]
    tasks: _containers.RepeatedScalarFieldContainer[str]
    skills: _containers.RepeatedCompositeFieldContainer[OccupationSkill]
    def __init__(self, code: _Optional[str] = ..., label: _Optional[str] = ..., sectors: _Optional[_Iterable[str]] = ..., titles: _Optional[_Iterable[str]] = ..., tasks: _Optional[_Iterable[str]] = ..., skills: _Optional[_Iterable[_Union[OccupationSkill, _Mapping]]] = ...) -> None: ...

class SuggestTransitionsRequest(_message.Message):
    __slots__ = ("code", "text", "skills", "k")
    CODE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SKILLS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    code: str
    text: str
    skills: _containers.RepeatedScalarFieldContainer[str]
    k: int
    def __init__(self, code: _Optional[str] = ..., text: _Optional[str] = ..., skills: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ...) -> None: ...

class Transition(_message.Message):
    __slots__ = ("code", "label", "score", "transferable_skills", "missing_skills", "skill_overlap", "proximity", "same_family", "viable", "transferable_skills_fr", "missing_skills_fr")
    CODE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TRANSFERABLE_SKILLS_FIELD_NUMBER: _ClassVar[int]
    MISSING_SKILLS_FIELD_NUMBER: _ClassVar[int]
    SKILL_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    PROXIMITY_FIELD_NUMBER: _ClassVar[int]
    SAME_FAMILY_FIELD_NUMBER: _ClassVar[int]
    VIABLE_FIELD_NUMBER: _ClassVar[int]
    TRANSFERABLE_SKILLS_FR_FIELD_NUMBER: _ClassVar[int]
    MISSING_SKILLS_FR_FIELD_NUMBER: _ClassVar[int]
    code: str
    label: str
    score: float
    transferable_skills: _containers.RepeatedScalarFieldContainer[str]
    missing_skills: _containers.RepeatedScalarFieldContainer[str]
    skill_overlap: float
    proximity: float
    same_family: bool
    viable: bool
    transferable_skills_fr: _containers.RepeatedScalarFieldContainer[str]
    missing_skills_fr: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, code: _Optional[str] = ..., label: _Optional[str] = ..., score: _Optional[float] = ..., transferable_skills: _Optional[_Iterable[str]] = ..., missing_skills: _Optional[_Iterable[str]] = ..., skill_overlap: _Optional[float] = ..., proximity: _Optional[float] = ..., same_family: _Optional[bool] = ..., viable: _Optional[bool] = ..., transferable_skills_fr: _Optional[_Iterable[str]] = ..., missing_skills_fr: _Optional[_Iterable[str]] = ...) -> None: ...

class SuggestTransitionsResponse(_message.Message):
    __slots__ = ("transitions", "model", "model_version")
    TRANSITIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    transitions: _containers.RepeatedCompositeFieldContainer[Transition]
    model: str
    model_version: str
    def __init__(self, transitions: _Optional[_Iterable[_Union[Transition, _Mapping]]] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class DescribeNeedsRequest(_message.Message):
    __slots__ = ("text", "k")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    text: str
    k: int
    def __init__(self, text: _Optional[str] = ..., k: _Optional[int] = ...) -> None: ...

class DescribeNeedsResponse(_message.Message):
    __slots__ = ("occupations", "typical_skills", "specific_skills", "model", "model_version")
    OCCUPATIONS_FIELD_NUMBER: _ClassVar[int]
    TYPICAL_SKILLS_FIELD_NUMBER: _ClassVar[int]
    SPECIFIC_SKILLS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    occupations: _containers.RepeatedCompositeFieldContainer[_match_pb2.OccupationMatch]
    typical_skills: _containers.RepeatedCompositeFieldContainer[ExtractedSkill]
    specific_skills: _containers.RepeatedCompositeFieldContainer[ExtractedSkill]
    model: str
    model_version: str
    def __init__(self, occupations: _Optional[_Iterable[_Union[_match_pb2.OccupationMatch, _Mapping]]] = ..., typical_skills: _Optional[_Iterable[_Union[ExtractedSkill, _Mapping]]] = ..., specific_skills: _Optional[_Iterable[_Union[ExtractedSkill, _Mapping]]] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...
