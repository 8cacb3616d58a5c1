from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class APICap(_message.Message):
    __slots__ = ["Deprecated", "DisabledAlternative", "DisabledReason", "DisabledReasonMsg", "Enabled", "ID"]
    DEPRECATED_FIELD_NUMBER: _ClassVar[int]
    DISABLEDALTERNATIVE_FIELD_NUMBER: _ClassVar[int]
    DISABLEDREASONMSG_FIELD_NUMBER: _ClassVar[int]
    DISABLEDREASON_FIELD_NUMBER: _ClassVar[int]
    Deprecated: bool
    DisabledAlternative: str
    DisabledReason: str
    DisabledReasonMsg: str
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    Enabled: bool
    ID: str
    ID_FIELD_NUMBER: _ClassVar[int]
    def __init__(self, ID: _Optional[str] = ..., Enabled: bool = ..., Deprecated: bool = ..., DisabledReason: _Optional[str] = ..., DisabledReasonMsg: _Optional[str] = ..., DisabledAlternative: _Optional[str] = ...) -> None: ...
