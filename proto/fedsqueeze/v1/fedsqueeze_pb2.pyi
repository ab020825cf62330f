from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Credentials(_message.Message):
    __slots__ = ("collaborator_id", "token")
    COLLABORATOR_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    collaborator_id: str
    token: str
    def __init__(self, collaborator_id: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class Layout(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class Payload(_message.Message):
    __slots__ = ("codec", "layout", "fingerprint", "data")
    CODEC_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    codec: str
    layout: Layout
    fingerprint: int
    data: bytes
    def __init__(self, codec: _Optional[str] = ..., layout: _Optional[_Union[Layout, _Mapping]] = ..., fingerprint: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("json", "sha256")
    JSON_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    json: str
    sha256: str
    def __init__(self, json: _Optional[str] = ..., sha256: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("name", "num_samples", "join_token", "layout", "buffers", "evaluates")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    JOIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    EVALUATES_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_samples: int
    join_token: str
    layout: Layout
    buffers: _containers.RepeatedScalarFieldContainer[str]
    evaluates: bool
    def __init__(self, name: _Optional[str] = ..., num_samples: _Optional[int] = ..., join_token: _Optional[str] = ..., layout: _Optional[_Union[Layout, _Mapping]] = ..., buffers: _Optional[_Iterable[str]] = ..., evaluates: bool = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("collaborator_id", "token", "plan", "shard_index", "num_shards", "layout")
    COLLABORATOR_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    collaborator_id: str
    token: str
    plan: Plan
    shard_index: int
    num_shards: int
    layout: Layout
    def __init__(self, collaborator_id: _Optional[str] = ..., token: _Optional[str] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ..., shard_index: _Optional[int] = ..., num_shards: _Optional[int] = ..., layout: _Optional[_Union[Layout, _Mapping]] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("credentials", "wait_ms")
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    credentials: Credentials
    wait_ms: int
    def __init__(self, credentials: _Optional[_Union[Credentials, _Mapping]] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class GetTaskResponse(_message.Message):
    __slots__ = ("kind", "round", "model", "message", "completed", "model_size")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[GetTaskResponse.Kind]
        WAIT: _ClassVar[GetTaskResponse.Kind]
        TRAIN: _ClassVar[GetTaskResponse.Kind]
        PREPASS: _ClassVar[GetTaskResponse.Kind]
        DONE: _ClassVar[GetTaskResponse.Kind]
        EVALUATE: _ClassVar[GetTaskResponse.Kind]
    KIND_UNSPECIFIED: GetTaskResponse.Kind
    WAIT: GetTaskResponse.Kind
    TRAIN: GetTaskResponse.Kind
    PREPASS: GetTaskResponse.Kind
    DONE: GetTaskResponse.Kind
    EVALUATE: GetTaskResponse.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    MODEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    kind: GetTaskResponse.Kind
    round: int
    model: Payload
    message: str
    completed: bool
    model_size: int
    def __init__(self, kind: _Optional[_Union[GetTaskResponse.Kind, str]] = ..., round: _Optional[int] = ..., model: _Optional[_Union[Payload, _Mapping]] = ..., message: _Optional[str] = ..., completed: bool = ..., model_size: _Optional[int] = ...) -> None: ...

class FetchModelRequest(_message.Message):
    __slots__ = ("credentials", "round")
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    credentials: Credentials
    round: int
    def __init__(self, credentials: _Optional[_Union[Credentials, _Mapping]] = ..., round: _Optional[int] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("chunk",)
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    chunk: bytes
    def __init__(self, chunk: _Optional[bytes] = ...) -> None: ...

class EvaluationRequest(_message.Message):
    __slots__ = ("credentials", "round", "metrics", "num_samples")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    credentials: Credentials
    round: int
    metrics: _containers.ScalarMap[str, float]
    num_samples: int
    def __init__(self, credentials: _Optional[_Union[Credentials, _Mapping]] = ..., round: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., num_samples: _Optional[int] = ...) -> None: ...

class EvaluationResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("credentials", "round", "num_samples", "payload_size", "metrics", "evaluation", "evaluation_samples")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class EvaluationEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    credentials: Credentials
    round: int
    num_samples: int
    payload_size: int
    metrics: _containers.ScalarMap[str, float]
    evaluation: _containers.ScalarMap[str, float]
    evaluation_samples: int
    def __init__(self, credentials: _Optional[_Union[Credentials, _Mapping]] = ..., round: _Optional[int] = ..., num_samples: _Optional[int] = ..., payload_size: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., evaluation: _Optional[_Mapping[str, float]] = ..., evaluation_samples: _Optional[int] = ...) -> None: ...

class SubmitUpdateRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class SubmitUpdateResponse(_message.Message):
    __slots__ = ("accepted", "message", "bytes_received")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    bytes_received: int
    def __init__(self, accepted: bool = ..., message: _Optional[str] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class DecoderArchitecture(_message.Message):
    __slots__ = ("kind", "sizes")
    class SizesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    kind: str
    sizes: _containers.ScalarMap[str, int]
    def __init__(self, kind: _Optional[str] = ..., sizes: _Optional[_Mapping[str, int]] = ...) -> None: ...

class DecoderHeader(_message.Message):
    __slots__ = ("credentials", "architecture", "size")
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    credentials: Credentials
    architecture: DecoderArchitecture
    size: int
    def __init__(self, credentials: _Optional[_Union[Credentials, _Mapping]] = ..., architecture: _Optional[_Union[DecoderArchitecture, _Mapping]] = ..., size: _Optional[int] = ...) -> None: ...

class UploadDecoderRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: DecoderHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[DecoderHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadDecoderResponse(_message.Message):
    __slots__ = ("accepted", "message", "bytes_received")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    bytes_received: int
    def __init__(self, accepted: bool = ..., message: _Optional[str] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("credentials", "reason")
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    credentials: Credentials
    reason: str
    def __init__(self, credentials: _Optional[_Union[Credentials, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
