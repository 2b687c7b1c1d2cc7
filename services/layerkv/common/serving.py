"""What every long-running layerkv server shares: logging to stdout, flags that default
from the environment, gRPC health + reflection, strict request parsing, Prometheus
metrics, and draining on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message as pb_message
from google.protobuf import unknown_fields
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from layerkv.common.requests import InvalidRequest

log = logging.getLogger(__name__)


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        stream=sys.stdout,
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )


def env_flag(
    parser: argparse.ArgumentParser, flag: str, env: str, default: Any, help: str, **kw: Any
) -> None:
    """Add ``flag`` whose default comes from environment variable ``env``.

    Flags beat the environment, which beats the built-in default; ``--help`` names the
    variable so a pod spec author knows what to set."""
    value: Any = os.environ.get(env, default)
    kind = kw.get("type")
    if kw.get("action") == "store_true":
        value = (
            str(value).lower() in ("1", "true", "yes", "on") if isinstance(value, str) else value
        )
    elif kind is not None and isinstance(value, str) and value != "":
        try:
            value = kind(value)
        except ValueError:
            parser.error(f"environment variable {env}={value!r} is not a valid {kind.__name__}")
    parser.add_argument(flag, default=value, help=f"{help} (env {env}; default {default!r})", **kw)


# -- gRPC --------------------------------------------------------------------------------


def add_health_and_reflection(
    server: grpc.aio.Server, service_names: Iterable[str]
) -> health.aio.HealthServicer:
    """Standard grpc.health.v1 and server reflection. Services start NOT_SERVING;
    the caller flips them to SERVING when ready."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    names = list(service_names)
    reflection.enable_server_reflection(
        [*names, reflection.SERVICE_NAME, health.SERVICE_NAME], server
    )
    return servicer


async def set_serving(
    servicer: health.aio.HealthServicer, names: Iterable[str], serving: bool
) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ["", *names]:  # "" is the whole server, what Kubernetes probes ask for
        await servicer.set(name, status)


def parse_strict(cls: type[pb_message.Message], data: bytes) -> pb_message.Message:
    """Parse a request, refusing what a default protobuf server would silently accept:
    bytes that are not the message, and fields this server does not know (a client
    built against a newer contract expects them to do something)."""
    try:
        msg = cls.FromString(data)
    except pb_message.DecodeError as e:
        raise InvalidRequest(f"malformed {cls.DESCRIPTOR.name}: {e}") from e
    unknown = _unknown_field_numbers(msg)
    if unknown:
        raise InvalidRequest(
            f"{cls.DESCRIPTOR.name} has fields this server does not know "
            f"(field numbers {sorted(unknown)}); client and server contracts differ"
        )
    return msg


def _unknown_field_numbers(msg: pb_message.Message) -> set[int]:
    found = {f.field_number for f in unknown_fields.UnknownFieldSet(msg)}
    for field, value in msg.ListFields():
        if field.type != pb_descriptor.FieldDescriptor.TYPE_MESSAGE:
            continue
        if field.is_repeated:
            for item in value:
                found |= _unknown_field_numbers(item)
        else:
            found |= _unknown_field_numbers(value)
    return found


def strict_generic_handler(
    service: pb_descriptor.ServiceDescriptor,
    servicer: Any,
    message_classes: dict[str, type[pb_message.Message]],
) -> grpc.GenericRpcHandler:
    """Method handlers for ``service`` that parse requests with :func:`parse_strict`.

    Generated ``add_*Servicer_to_server`` functions let protobuf parse requests, and a
    parse failure then surfaces as INTERNAL; here a bad request gets INVALID_ARGUMENT
    with the reason. ``message_classes`` maps full message names to classes."""
    handlers = {}
    for method in service.methods:
        impl = getattr(servicer, method.name)
        req_cls = message_classes[method.input_type.full_name]
        resp_cls = message_classes[method.output_type.full_name]
        wrapped = _wrap_stream if method.server_streaming else _wrap_unary
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            wrapped(impl, req_cls),
            request_deserializer=None,  # raw bytes: parsed in the wrapper
            response_serializer=resp_cls.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _wrap_unary(impl: Callable, req_cls: type[pb_message.Message]) -> Callable:
    async def handler(data: bytes, context: grpc.aio.ServicerContext):
        try:
            request = parse_strict(req_cls, data)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return await impl(request, context)

    return handler


def _wrap_stream(impl: Callable, req_cls: type[pb_message.Message]) -> Callable:
    async def handler(data: bytes, context: grpc.aio.ServicerContext):
        try:
            request = parse_strict(req_cls, data)
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        async for item in impl(request, context):
            yield item

    return handler


def message_classes(*modules: Any) -> dict[str, type[pb_message.Message]]:
    """Full protobuf name -> class, for the generated ``*_pb2`` modules given."""
    out: dict[str, type[pb_message.Message]] = {}
    for module in modules:
        for name in module.DESCRIPTOR.message_types_by_name:
            cls = getattr(module, name)
            out[cls.DESCRIPTOR.full_name] = cls
    return out


# -- process lifecycle -----------------------------------------------------------------


def install_shutdown_signals(stop: asyncio.Event) -> None:
    """SIGTERM (Kubernetes) and SIGINT (Ctrl-C) set ``stop``; the server then drains."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def start_metrics_server(port: int) -> None:
    """Prometheus exposition on ``:port/metrics``; port 0 turns it off."""
    if port:
        from prometheus_client import start_http_server

        start_http_server(port)
        log.info("metrics on :%d/metrics", port)


# Keepalive on both ends: a worker that dies without closing its socket (node lost,
# process frozen) is noticed within ~keepalive_time + keepalive_timeout, so streams
# through admission end with an error instead of hanging.
KEEPALIVE_CLIENT_OPTIONS = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)
KEEPALIVE_SERVER_OPTIONS = (
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
)


@dataclasses.dataclass
class RunningServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    service_name: str

    async def set_serving(self, serving: bool) -> None:
        await set_serving(self.health, [self.service_name], serving)


async def start_grpc_server(
    service: pb_descriptor.ServiceDescriptor,
    servicer: Any,
    pb2_modules: Iterable[Any],
    host: str,
    port: int,
) -> RunningServer:
    """A started grpc.aio server with ``servicer`` (strict parsing), health (NOT_SERVING
    until the caller says otherwise) and reflection. ``port`` 0 picks a free port."""
    server = grpc.aio.server(options=KEEPALIVE_SERVER_OPTIONS)
    server.add_generic_rpc_handlers(
        (strict_generic_handler(service, servicer, message_classes(*pb2_modules)),)
    )
    health_servicer = add_health_and_reflection(server, [service.full_name])
    # grpc's HealthServicer starts the whole server ("") as SERVING; not ready yet.
    await set_serving(health_servicer, [service.full_name], False)
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise OSError(f"cannot listen on {host}:{port}")
    await server.start()
    return RunningServer(server, health_servicer, bound, service.full_name)
