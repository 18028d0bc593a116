"""Bodies of the Open Inference Protocol (KServe v2 REST), the second route set beside the native one.

Field names and shapes are the protocol's (https://github.com/kserve/open-inference-protocol), so any OIP
client can talk to mpserve; :mod:`server.oip_tensors` checks a tensor's data against the model, and
:mod:`server.routes.oip` serves them. Requests forbid unknown fields, as the native ones do.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

#: The tensor datatypes the protocol names; of the inputs mpserve reads FP32 and UINT8 (pixel values).
Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16",
                   "FP32", "FP64", "BYTES"]
Parameters = dict[str, StrictStr | StrictInt | StrictFloat | StrictBool]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Parameters(BaseModel):
    """Parameters are open key/value pairs in the protocol (e.g. MLServer's content_type): unknown ones are ignored."""

    model_config = ConfigDict(extra="ignore")


class InputParameters(_Parameters):
    binary_data_size: StrictInt | None = Field(None, ge=0, description="binary tensor data extension: this "
                                               "input's data are the next binary_data_size bytes after the "
                                               "JSON header (Inference-Header-Content-Length)")


class RequestInput(_Request):
    name: StrictStr = Field(description="the input's name, as GET /v2/models/{model} lists it")
    shape: list[Annotated[StrictInt, Field(ge=0)]] = Field(description="[N, *input_shape]")
    datatype: Datatype = Field(description="FP32 or UINT8")
    parameters: InputParameters | None = None
    data: list[Any] | None = Field(None, description="row-major values, flat or nested; absent when the data "
                                                     "are binary")


class OutputParameters(_Parameters):
    binary_data: StrictBool | None = Field(None, description="this output as binary tensor data (default: "
                                                             "parameters.binary_data_output, else JSON)")


class RequestOutput(_Request):
    name: StrictStr
    parameters: OutputParameters | None = None


class InferRequest(_Request):
    id: StrictStr | None = Field(None, description="echoed in the response")
    parameters: Parameters | None = None
    inputs: list[RequestInput] = Field(min_length=1, max_length=1, description="one input tensor of images")
    outputs: list[RequestOutput] | None = Field(None, description="the outputs wanted (default: all)")


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: Datatype
    parameters: dict[str, int] | None = Field(None, description="binary_data_size: the output's bytes after the "
                                                                "JSON, when binary data were asked for")
    data: list[Any] | None = Field(None, description="row-major values; absent when binary")


class InferResponse(BaseModel):
    model_name: str
    model_version: str = Field(description="the model version that produced these outputs")
    id: str | None = None
    outputs: list[ResponseOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: Datatype
    shape: list[int] = Field(description="-1: any size along that axis (the batch)")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="the version this replica serves")
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool
    error: str | None = Field(None, description="why not, when not ready")


class ModelReady(BaseModel):
    name: str
    ready: bool
    error: str | None = Field(None, description="why not, when not ready")


class OipError(BaseModel):
    error: str = Field(description="what is wrong, in words")
