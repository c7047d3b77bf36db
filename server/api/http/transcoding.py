"""gRPC-JSON transcoding: POST /openemploi.v1.<Service>/<Method> with the request message as JSON.

The path is the gRPC method's own, so the scope table, grpcurl and the proto docs name the same
thing. The body is the proto3 JSON form of the request (field names as in the proto, or
lowerCamelCase); the answer is the response's, with proto field names and zero values shown.
Streaming methods stay on gRPC.
"""

from __future__ import annotations

from google.protobuf import json_format
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .calls import invoke, read_json, request_id
from .errors import HttpError, bad_request, render, route_not_found
from .services import HttpServices


def unary_methods(services: HttpServices) -> list[str]:
    """The paths this route answers: every unary method of every registered service."""
    return [
        f"/{name}/{method.name}"
        for name, service in services.services.items()
        for method in service.descriptor.methods
        if not method.client_streaming and not method.server_streaming
    ]


async def transcode(services: HttpServices, request: Request) -> Response:
    rid = request_id(request)
    service_name, method_name = request.path_params["service"], request.path_params["method"]
    try:
        service = services.services.get(service_name)
        if service is None:
            raise route_not_found(f"no service {service_name!r} (have: {', '.join(sorted(services.services))})")
        method = service.descriptor.methods_by_name.get(method_name)
        if method is None:
            raise route_not_found(f"{service_name} has no method {method_name!r}")
        if method.client_streaming or method.server_streaming:
            raise bad_request(f"{method_name} is a streaming RPC: call it over gRPC", None, "STREAMING_METHOD")
        body = await read_json(request, services.limits.max_message_bytes)
        message = getattr(service.pb_module, method.input_type.name)()
        try:
            json_format.ParseDict(body or {}, message)
        except json_format.ParseError as exc:
            raise bad_request(f"the body is not a {method.input_type.full_name}: {exc}", None, "INVALID_JSON") from None
        response, context = await invoke(services, request, f"/{service_name}/{method_name}", message, rid)
    except HttpError as exc:
        exc.headers.setdefault("x-request-id", rid)
        return render(exc)
    body = json_format.MessageToDict(response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return JSONResponse(body, headers=context.headers())
