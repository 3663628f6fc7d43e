"""The ASGI application: the hot inference routes, then Starlette for everything else.

The three inference routes are looked up by exact path before any framework
code runs; the rest (model listing, health, metrics) is ordinary Starlette.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

import orjson
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from aiguillage.api.asgi import Receive, Scope, Send
from aiguillage.api.errors import ApiError, forbidden, invalid_request, not_found, unauthorized
from aiguillage.api.inference import InferenceEndpoint
from aiguillage.api.jobs import JobsApi
from aiguillage.api.transcription import TRANSCRIPTIONS_PATH, TranscriptionEndpoint
from aiguillage.auth.identity import ApiKeyRecord
from aiguillage.catalog.config import GatewayConfig, ServerConfig
from aiguillage.gateway import Gateway, UnknownTarget, open_gateway
from aiguillage.store.database import Database
from aiguillage.store.sealing import SecretsKeyMissing

log = logging.getLogger(__name__)

GatewayFactory = Callable[[GatewayConfig], Awaitable[Gateway]]

INFERENCE_ROUTES = {
    "/v1/chat/completions": True,  # path -> may stream
    "/v1/completions": True,
    "/v1/embeddings": False,
}


class AiguillageApp:
    def __init__(
        self, config: GatewayConfig, gateway_factory: GatewayFactory = open_gateway
    ) -> None:
        self.config = config
        self._factory = gateway_factory
        self._gateway: Gateway | None = None
        self._hot: dict[str, InferenceEndpoint] = {}
        self.jobs_api = JobsApi(config.jobs, self._database)
        self._other = Starlette(
            routes=[
                Route("/v1/models", self._list_models, methods=["GET"]),
                Route("/v1/models/{model_id:path}", self._get_model, methods=["GET"]),
                Route("/healthz", self._healthz, methods=["GET"]),
                Route("/readyz", self._readyz, methods=["GET"]),
                Route("/metrics", self._metrics, methods=["GET"]),
                Route("/admin/dispatch", self._admin_dispatch, methods=["GET"]),
                *self.jobs_api.routes(),
                Route("/admin/keys/{key_id:int}/revoke", self._admin_revoke, methods=["POST"]),
                Route(
                    "/admin/models/{model:path}/servers", self._admin_add_server, methods=["POST"]
                ),
                Route(
                    "/admin/models/{model:path}/servers/{server:path}",
                    self._admin_remove_server,
                    methods=["DELETE"],
                ),
            ],
            exception_handlers={
                ApiError: _api_error_response,
                HTTPException: _http_error_response,
                DBAPIError: _store_unavailable_response,
                OSError: _store_unavailable_response,  # a connection the driver could not open
                Exception: _unexpected_error_response,
            },
        )

    @property
    def gateway(self) -> Gateway:
        if self._gateway is None:
            raise ApiError(
                503,
                "The gateway is starting.",
                type="service_unavailable",
                code="starting",
                headers={"retry-after": "1"},
            )
        return self._gateway

    def _database(self) -> Database:
        database = self.gateway.database
        if database is None:
            raise ApiError(
                503, "This gateway has no database.", type="service_unavailable", code="no_database"
            )
        return database

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            endpoint = self._hot.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)
            else:
                await self._other(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def startup(self) -> None:
        gateway = await self._factory(self.config)
        await gateway.start()
        self._gateway = gateway
        self._hot = {
            path: InferenceEndpoint(gateway, path, streamable=streamable)
            for path, streamable in INFERENCE_ROUTES.items()
        }
        self._hot[TRANSCRIPTIONS_PATH] = TranscriptionEndpoint(gateway)

    async def shutdown(self) -> None:
        if self._gateway is not None:
            await self._gateway.stop()
            self._gateway = None
            self._hot = {}

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as error:
                    log.exception("gateway failed to start")
                    await send({"type": "lifespan.startup.failed", "message": str(error)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _identity(self, request: Request) -> ApiKeyRecord:
        return await self.gateway.authenticator.authenticate(request.headers.get("authorization"))

    async def _admin(self, request: Request) -> ApiKeyRecord:
        identity = await self._identity(request)
        if not identity.is_admin:
            raise forbidden("This route needs an admin key.", code="admin_required")
        return identity

    async def _admin_dispatch(self, request: Request) -> Response:
        """Per model, the queue by priority and organisation; per backend, load, leases,
        circuit; the reasons of the last routing decisions."""
        await self._admin(request)
        return _json(await self.gateway.scheduler.explain())

    async def _admin_revoke(self, request: Request) -> Response:
        """Revoke a key on every replica (through the database's change notice)."""
        await self._admin(request)
        key_id: int = request.path_params["key_id"]
        if not await self.gateway.revoke_key(key_id):
            raise not_found(f"No API key with id {key_id}.", param="key_id", code="key_not_found")
        return _json({"id": key_id, "revoked": True})

    async def _admin_add_server(self, request: Request) -> Response:
        """Add a server to a model, on every replica and across restarts."""
        await self._admin(request)
        model = request.path_params["model"]
        server = _server_config(await request.body())
        try:
            await self.gateway.add_server(model, server)
        except UnknownTarget as error:
            raise not_found(str(error), param="model") from None
        except SecretsKeyMissing as error:
            raise invalid_request(f"{error}.", param="token", code="secrets_key_missing") from None
        return _json(self._servers_of(model), status=201)

    async def _admin_remove_server(self, request: Request) -> Response:
        """Stop routing a model to one of its servers (by backend name or URL)."""
        await self._admin(request)
        model = request.path_params["model"]
        try:
            await self.gateway.remove_server(model, request.path_params["server"])
        except UnknownTarget as error:
            raise not_found(str(error), code="server_not_found") from None
        return _json(self._servers_of(model))

    def _servers_of(self, model: str) -> dict[str, object]:
        entry = self.gateway.catalog.resolve(model)
        servers = [] if entry is None else [backend.base_url for backend in entry.backends]
        return {"model": model, "servers": servers}

    async def _list_models(self, request: Request) -> Response:
        identity = await self._identity(request)
        data = [entry.as_openai() for entry in self.gateway.catalog.visible_to(identity)]
        return _json({"object": "list", "data": data})

    async def _get_model(self, request: Request) -> Response:
        identity = await self._identity(request)
        model_id = request.path_params["model_id"]
        entry = self.gateway.catalog.resolve(model_id)
        if entry is None or not identity.may_use(entry.name):
            raise not_found(f"The model '{model_id}' does not exist.", param="model")
        return _json(entry.as_openai())

    async def _healthz(self, request: Request) -> Response:
        return _json({"status": "alive"})

    async def _readyz(self, request: Request) -> Response:
        models = self.gateway.ready()
        ready = all(models.values())
        return _json(
            {"status": "ready" if ready else "not ready", "models": models},
            status=200 if ready else 503,
        )

    async def _metrics(self, request: Request) -> Response:
        """Prometheus text; behind `metrics_token` when one is set (backend names are in it)."""
        token = self.gateway.config.metrics_token
        if token is not None:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").encode()
            if not hmac.compare_digest(given, token.get_secret_value().encode()):
                raise unauthorized(
                    "/metrics needs the metrics token.", code="invalid_metrics_token"
                )
        metrics = self.gateway.metrics
        return Response(metrics.render(), media_type=metrics.content_type)


def _server_config(body: bytes) -> ServerConfig:
    """The request body as a `ServerConfig`, or a 400 that says which field is wrong."""
    try:
        return ServerConfig.model_validate_json(body)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        raise invalid_request(f"Invalid server: {first['msg']}.", param=field) from None


def _json(document: object, status: int = 200) -> Response:
    return Response(orjson.dumps(document), status_code=status, media_type="application/json")


async def _api_error_response(request: Request, error: Exception) -> Response:
    assert isinstance(error, ApiError)
    return Response(
        error.body(), status_code=error.status, headers=error.headers, media_type="application/json"
    )


async def _http_error_response(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    if error.status_code == 404:
        api_error = ApiError(
            404,
            f"No route {request.method} {request.url.path}.",
            type="invalid_request_error",
            code="unknown_route",
        )
    elif error.status_code == 405:
        api_error = ApiError(
            405,
            f"Method {request.method} is not allowed on {request.url.path}.",
            type="invalid_request_error",
            code="method_not_allowed",
            headers=dict(error.headers or {}),
        )
    else:
        api_error = ApiError(error.status_code, str(error.detail), type="invalid_request_error")
    return await _api_error_response(request, api_error)


async def _store_unavailable_response(request: Request, error: Exception) -> Response:
    """The database went away under a route that needs it: a retryable 503, not a 500."""
    log.warning("database unreachable on %s: %s", request.url.path, type(error).__name__)
    return await _api_error_response(
        request,
        ApiError(
            503,
            "The gateway's database is unreachable right now; retry shortly.",
            type="service_unavailable",
            code="store_unavailable",
            headers={"retry-after": "5"},
        ),
    )


async def _unexpected_error_response(request: Request, error: Exception) -> Response:
    log.error("unexpected error on %s", request.url.path, exc_info=error)
    return await _api_error_response(
        request, ApiError(500, "Internal gateway error.", type="server_error")
    )
