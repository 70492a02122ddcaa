from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("data", "dtype", "shape")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(
        self,
        dtype: str | None = ...,
        shape: _Iterable[int] | None = ...,
        data: bytes | None = ...,
    ) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = (
        "dtype",
        "end",
        "free_cache_bytes",
        "hidden_size",
        "max_message_bytes",
        "max_sessions",
        "model_id",
        "node_id",
        "quant",
        "start",
        "step_ms_per_block",
        "throughput",
    )
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
    def __init__(
        self,
        node_id: str | None = ...,
        model_id: str | None = ...,
        start: int | None = ...,
        end: int | None = ...,
        dtype: str | None = ...,
        quant: str | None = ...,
        throughput: float | None = ...,
        step_ms_per_block: float | None = ...,
        free_cache_bytes: int | None = ...,
        hidden_size: int | None = ...,
        max_message_bytes: int | None = ...,
        max_sessions: int | None = ...,
    ) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("end", "hidden", "model_id", "start")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    start: int
    end: int
    hidden: Tensor
    def __init__(
        self,
        model_id: str | None = ...,
        start: int | None = ...,
        end: int | None = ...,
        hidden: Tensor | _Mapping | None = ...,
    ) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("hidden",)
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    def __init__(self, hidden: Tensor | _Mapping | None = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("end", "grad_output", "hidden", "model_id", "start")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    start: int
    end: int
    hidden: Tensor
    grad_output: Tensor
    def __init__(
        self,
        model_id: str | None = ...,
        start: int | None = ...,
        end: int | None = ...,
        hidden: Tensor | _Mapping | None = ...,
        grad_output: Tensor | _Mapping | None = ...,
    ) -> None: ...

class BackwardResponse(_message.Message):
    __slots__ = ("grad_input",)
    GRAD_INPUT_FIELD_NUMBER: _ClassVar[int]
    grad_input: Tensor
    def __init__(self, grad_input: Tensor | _Mapping | None = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("batch_size", "end", "max_length", "model_id", "start")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    start: int
    end: int
    max_length: int
    batch_size: int
    def __init__(
        self,
        model_id: str | None = ...,
        start: int | None = ...,
        end: int | None = ...,
        max_length: int | None = ...,
        batch_size: int | None = ...,
    ) -> None: ...

class Step(_message.Message):
    __slots__ = ("hidden", "position")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    position: int
    def __init__(self, hidden: Tensor | _Mapping | None = ..., position: int | None = ...) -> None: ...

class InferenceRequest(_message.Message):
    __slots__ = ("open", "session_id", "step")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    open: OpenSession
    step: Step
    def __init__(
        self,
        session_id: str | None = ...,
        open: OpenSession | _Mapping | None = ...,
        step: Step | _Mapping | None = ...,
    ) -> None: ...

class InferenceResponse(_message.Message):
    __slots__ = ("hidden", "length", "session_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    hidden: Tensor
    length: int
    def __init__(
        self,
        session_id: str | None = ...,
        hidden: Tensor | _Mapping | None = ...,
        length: int | None = ...,
    ) -> None: ...
