from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdapterGrads(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_GRADS_NONE: _ClassVar[AdapterGrads]
    ADAPTER_GRADS_PER_SAMPLE: _ClassVar[AdapterGrads]
    ADAPTER_GRADS_NORMS: _ClassVar[AdapterGrads]
ADAPTER_GRADS_NONE: AdapterGrads
ADAPTER_GRADS_PER_SAMPLE: AdapterGrads
ADAPTER_GRADS_NORMS: AdapterGrads

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class NamedTensor(_message.Message):
    __slots__ = ("name", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor: Tensor
    def __init__(self, name: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Adapter(_message.Message):
    __slots__ = ("hash", "scaling", "tensors")
    HASH_FIELD_NUMBER: _ClassVar[int]
    SCALING_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    hash: str
    scaling: float
    tensors: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, hash: _Optional[str] = ..., scaling: _Optional[float] = ..., tensors: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class PutAdapterRequest(_message.Message):
    __slots__ = ("model_id", "adapter")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    adapter: Adapter
    def __init__(self, model_id: _Optional[str] = ..., adapter: _Optional[_Union[Adapter, _Mapping]] = ...) -> None: ...

class PutAdapterResponse(_message.Message):
    __slots__ = ("hash",)
    HASH_FIELD_NUMBER: _ClassVar[int]
    hash: str
    def __init__(self, hash: _Optional[str] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("node_id", "model_id", "start", "end", "dtype", "quant", "throughput", "step_ms_per_block", "free_cache_bytes", "hidden_size", "max_message_bytes", "max_sessions")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    QUANT_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    STEP_MS_PER_BLOCK_FIELD_NUMBER: _ClassVar[int]
    FREE_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    model_id: str
    start: int
    end: int
    dtype: str
    quant: str
    throughput: float
    step_ms_per_block: float
    free_cache_bytes: int
    hidden_size: int
    max_message_bytes: int
    max_sessions: int
    def __init__(self, node_id: _Optional[str] = ..., model_id: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., dtype: _Optional[str] = ..., quant: _Optional[str] = ..., throughput: _Optional[float] = ..., step_ms_per_block: _Optional[float] = ..., free_cache_bytes: _Optional[int] = ..., hidden_size: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_sessions: _Optional[int] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("model_id", "start", "end", "hidden", "adapter")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    start: int
    end: int
    hidden: Tensor
    adapter: str
    def __init__(self, model_id: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., adapter: _Optional[str] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("hidden",)
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("model_id", "start", "end", "hidden", "grad_output", "adapter", "adapter_grads", "step_id", "skip_grad_input")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_GRADS_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    SKIP_GRAD_INPUT_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    start: int
    end: int
    hidden: Tensor
    grad_output: Tensor
    adapter: str
    adapter_grads: AdapterGrads
    step_id: str
    skip_grad_input: bool
    def __init__(self, model_id: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., grad_output: _Optional[_Union[Tensor, _Mapping]] = ..., adapter: _Optional[str] = ..., adapter_grads: _Optional[_Union[AdapterGrads, str]] = ..., step_id: _Optional[str] = ..., skip_grad_input: _Optional[bool] = ...) -> None: ...

class BackwardResponse(_message.Message):
    __slots__ = ("grad_input", "adapter_grads", "squared_norms")
    GRAD_INPUT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_GRADS_FIELD_NUMBER: _ClassVar[int]
    SQUARED_NORMS_FIELD_NUMBER: _ClassVar[int]
    grad_input: Tensor
    adapter_grads: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    squared_norms: Tensor
    def __init__(self, grad_input: _Optional[_Union[Tensor, _Mapping]] = ..., adapter_grads: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., squared_norms: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ClipSumRequest(_message.Message):
    __slots__ = ("step_id", "clip_factors")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    CLIP_FACTORS_FIELD_NUMBER: _ClassVar[int]
    step_id: str
    clip_factors: Tensor
    def __init__(self, step_id: _Optional[str] = ..., clip_factors: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ClipSumResponse(_message.Message):
    __slots__ = ("adapter_grads",)
    ADAPTER_GRADS_FIELD_NUMBER: _ClassVar[int]
    adapter_grads: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, adapter_grads: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("model_id", "start", "end", "max_length", "batch_size", "adapter")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    start: int
    end: int
    max_length: int
    batch_size: int
    adapter: str
    def __init__(self, model_id: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., max_length: _Optional[int] = ..., batch_size: _Optional[int] = ..., adapter: _Optional[str] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("hidden", "position")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    position: int
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ..., position: _Optional[int] = ...) -> None: ...

class InferenceRequest(_message.Message):
    __slots__ = ("session_id", "open", "step")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    open: OpenSession
    step: Step
    def __init__(self, session_id: _Optional[str] = ..., open: _Optional[_Union[OpenSession, _Mapping]] = ..., step: _Optional[_Union[Step, _Mapping]] = ...) -> None: ...

class InferenceResponse(_message.Message):
    __slots__ = ("session_id", "hidden", "length")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    hidden: Tensor
    length: int
    def __init__(self, session_id: _Optional[str] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., length: _Optional[int] = ...) -> None: ...
