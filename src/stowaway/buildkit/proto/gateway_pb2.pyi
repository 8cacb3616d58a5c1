from stowaway.buildkit.proto import ops_pb2 as _ops_pb2
from stowaway.buildkit.proto import caps_pb2 as _caps_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CacheOptionsEntry(_message.Message):
    __slots__ = ["Attrs", "Type"]
    class AttrsEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    Attrs: _containers.ScalarMap[str, str]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    Type: str
    def __init__(self, Type: _Optional[str] = ..., Attrs: _Optional[_Mapping[str, str]] = ...) -> None: ...

class FileRange(_message.Message):
    __slots__ = ["Length", "Offset"]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    Length: int
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    Offset: int
    def __init__(self, Offset: _Optional[int] = ..., Length: _Optional[int] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class PongResponse(_message.Message):
    __slots__ = ["FrontendAPICaps", "LLBCaps"]
    FRONTENDAPICAPS_FIELD_NUMBER: _ClassVar[int]
    FrontendAPICaps: _containers.RepeatedCompositeFieldContainer[_caps_pb2.APICap]
    LLBCAPS_FIELD_NUMBER: _ClassVar[int]
    LLBCaps: _containers.RepeatedCompositeFieldContainer[_caps_pb2.APICap]
    def __init__(self, FrontendAPICaps: _Optional[_Iterable[_Union[_caps_pb2.APICap, _Mapping]]] = ..., LLBCaps: _Optional[_Iterable[_Union[_caps_pb2.APICap, _Mapping]]] = ...) -> None: ...

class ReadFileRequest(_message.Message):
    __slots__ = ["FilePath", "Range", "Ref"]
    FILEPATH_FIELD_NUMBER: _ClassVar[int]
    FilePath: str
    RANGE_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    Range: FileRange
    Ref: str
    def __init__(self, Ref: _Optional[str] = ..., FilePath: _Optional[str] = ..., Range: _Optional[_Union[FileRange, _Mapping]] = ...) -> None: ...

class ReadFileResponse(_message.Message):
    __slots__ = ["Data"]
    DATA_FIELD_NUMBER: _ClassVar[int]
    Data: bytes
    def __init__(self, Data: _Optional[bytes] = ...) -> None: ...

class Ref(_message.Message):
    __slots__ = ["id"]
    DEF_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ..., **kwargs) -> None: ...

class RefMap(_message.Message):
    __slots__ = ["refs"]
    class RefsEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Ref
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Ref, _Mapping]] = ...) -> None: ...
    REFS_FIELD_NUMBER: _ClassVar[int]
    refs: _containers.MessageMap[str, Ref]
    def __init__(self, refs: _Optional[_Mapping[str, Ref]] = ...) -> None: ...

class RefMapDeprecated(_message.Message):
    __slots__ = ["refs"]
    class RefsEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REFS_FIELD_NUMBER: _ClassVar[int]
    refs: _containers.ScalarMap[str, str]
    def __init__(self, refs: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ResolveImageConfigRequest(_message.Message):
    __slots__ = ["LogName", "Platform", "Ref", "ResolveMode"]
    LOGNAME_FIELD_NUMBER: _ClassVar[int]
    LogName: str
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    Platform: _ops_pb2.Platform
    REF_FIELD_NUMBER: _ClassVar[int]
    RESOLVEMODE_FIELD_NUMBER: _ClassVar[int]
    Ref: str
    ResolveMode: str
    def __init__(self, Ref: _Optional[str] = ..., Platform: _Optional[_Union[_ops_pb2.Platform, _Mapping]] = ..., ResolveMode: _Optional[str] = ..., LogName: _Optional[str] = ...) -> None: ...

class ResolveImageConfigResponse(_message.Message):
    __slots__ = ["Config", "Digest"]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    Config: bytes
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    Digest: str
    def __init__(self, Digest: _Optional[str] = ..., Config: _Optional[bytes] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ["metadata", "ref", "refDeprecated", "refs", "refsDeprecated"]
    class MetadataEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    METADATA_FIELD_NUMBER: _ClassVar[int]
    REFDEPRECATED_FIELD_NUMBER: _ClassVar[int]
    REFSDEPRECATED_FIELD_NUMBER: _ClassVar[int]
    REFS_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    metadata: _containers.ScalarMap[str, bytes]
    ref: Ref
    refDeprecated: str
    refs: RefMap
    refsDeprecated: RefMapDeprecated
    def __init__(self, refDeprecated: _Optional[str] = ..., refsDeprecated: _Optional[_Union[RefMapDeprecated, _Mapping]] = ..., ref: _Optional[_Union[Ref, _Mapping]] = ..., refs: _Optional[_Union[RefMap, _Mapping]] = ..., metadata: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class ReturnRequest(_message.Message):
    __slots__ = ["error", "result"]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    error: Status
    result: Result
    def __init__(self, result: _Optional[_Union[Result, _Mapping]] = ..., error: _Optional[_Union[Status, _Mapping]] = ...) -> None: ...

class ReturnResponse(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class SolveRequest(_message.Message):
    __slots__ = ["CacheImports", "Definition", "ExporterAttr", "Final", "Frontend", "FrontendOpt", "ImportCacheRefsDeprecated", "allowResultArrayRef", "allowResultReturn"]
    class FrontendOptEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ALLOWRESULTARRAYREF_FIELD_NUMBER: _ClassVar[int]
    ALLOWRESULTRETURN_FIELD_NUMBER: _ClassVar[int]
    CACHEIMPORTS_FIELD_NUMBER: _ClassVar[int]
    CacheImports: _containers.RepeatedCompositeFieldContainer[CacheOptionsEntry]
    DEFINITION_FIELD_NUMBER: _ClassVar[int]
    Definition: _ops_pb2.Definition
    EXPORTERATTR_FIELD_NUMBER: _ClassVar[int]
    ExporterAttr: bytes
    FINAL_FIELD_NUMBER: _ClassVar[int]
    FRONTENDOPT_FIELD_NUMBER: _ClassVar[int]
    FRONTEND_FIELD_NUMBER: _ClassVar[int]
    Final: bool
    Frontend: str
    FrontendOpt: _containers.ScalarMap[str, str]
    IMPORTCACHEREFSDEPRECATED_FIELD_NUMBER: _ClassVar[int]
    ImportCacheRefsDeprecated: _containers.RepeatedScalarFieldContainer[str]
    allowResultArrayRef: bool
    allowResultReturn: bool
    def __init__(self, Definition: _Optional[_Union[_ops_pb2.Definition, _Mapping]] = ..., Frontend: _Optional[str] = ..., FrontendOpt: _Optional[_Mapping[str, str]] = ..., ImportCacheRefsDeprecated: _Optional[_Iterable[str]] = ..., allowResultReturn: bool = ..., allowResultArrayRef: bool = ..., Final: bool = ..., ExporterAttr: _Optional[bytes] = ..., CacheImports: _Optional[_Iterable[_Union[CacheOptionsEntry, _Mapping]]] = ...) -> None: ...

class SolveResponse(_message.Message):
    __slots__ = ["ref", "result"]
    REF_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ref: str
    result: Result
    def __init__(self, ref: _Optional[str] = ..., result: _Optional[_Union[Result, _Mapping]] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ["code", "message"]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...
