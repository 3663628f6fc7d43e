"""HTTP routes of the transcription jobs API and its OAuth2 token endpoint (logic is in jobs/).

`POST /oauth/token` follows RFC 6749 (client credentials grant, form-encoded,
client authentication by HTTP Basic or in the body) and answers errors in the
RFC's shape (`{"error": "invalid_client", ...}`), which OAuth client libraries
parse. The job routes answer OpenAI-style errors like the rest of the gateway.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import orjson
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from aiguillage.api.errors import ApiError, forbidden, invalid_request, not_found, unauthorized
from aiguillage.auth.oauth import SCOPE_READ, SCOPE_WRITE, Caller, granted_scopes, new_access_token
from aiguillage.catalog.config import JobsConfig
from aiguillage.jobs.media import MediaStorage
from aiguillage.jobs.options import JobOptions
from aiguillage.jobs.pipeline import loaded
from aiguillage.jobs.states import JobState
from aiguillage.jobs.upload import FormError, StreamingForm, UploadTooLarge
from aiguillage.jobs.urls import UrlRefused, check_url
from aiguillage.speech.formats import render
from aiguillage.store.database import Database
from aiguillage.store.jobs import JobRecord, JobRepository
from aiguillage.store.oauth import OAuthRepository

MAX_TOKEN_REQUEST_BYTES = 16 * 1024
MULTIPART_OVERHEAD_BYTES = 256 * 1024  # headers, boundaries and the options field
RESULT_FORMATS = {  # ?format= -> (speech.formats name, content type, file extension)
    "json": ("verbose_json", "application/json", "json"),
    "vtt": ("vtt", "text/vtt; charset=utf-8", "vtt"),
    "srt": ("srt", "application/x-subrip; charset=utf-8", "srt"),
    "txt": ("text", "text/plain; charset=utf-8", "txt"),
}


class JobsApi:
    """The routes, given how to reach the database once the gateway has started."""

    def __init__(self, config: JobsConfig, database: Callable[[], Database]) -> None:
        self.config = config
        self._database = database
        self.storage = MediaStorage(config.storage_dir)

    def routes(self) -> list[Route]:
        return [
            Route("/oauth/token", self.token, methods=["POST"]),
            Route("/v1/transcription-jobs", self.create, methods=["POST"]),
            Route("/v1/transcription-jobs", self.list_jobs, methods=["GET"]),
            Route("/v1/transcription-jobs/{job_id}", self.show, methods=["GET"]),
            Route("/v1/transcription-jobs/{job_id}", self.delete, methods=["DELETE"]),
            Route("/v1/transcription-jobs/{job_id}/result", self.result, methods=["GET"]),
        ]

    @property
    def jobs(self) -> JobRepository:
        return JobRepository(self._database(), webhook_every_state=self.config.webhooks.every_state)

    @property
    def oauth(self) -> OAuthRepository:
        return OAuthRepository(self._database())

    async def token(self, request: Request) -> Response:
        """The client credentials grant: a bearer token for the job routes."""
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_TOKEN_REQUEST_BYTES:
                return _oauth_error(400, "invalid_request", "The request is too large.")
        params = {key: values[0] for key, values in parse_qs(body.decode("latin-1")).items()}
        if params.get("grant_type") != "client_credentials":
            return _oauth_error(
                400, "unsupported_grant_type", "Only grant_type=client_credentials is supported."
            )
        credentials = _basic_credentials(request.headers.get("authorization"))
        client_id, secret = credentials or (params.get("client_id"), params.get("client_secret"))
        if not client_id or not secret:
            return _oauth_error(401, "invalid_client", "Send client_id and client_secret.")
        client = await self.oauth.authenticate_client(client_id, secret)
        if client is None:
            return _oauth_error(401, "invalid_client", "Unknown client or wrong secret.")
        scopes = granted_scopes(params.get("scope"), client.scopes)
        if scopes is None:
            return _oauth_error(400, "invalid_scope", f"Allowed scopes: {' '.join(client.scopes)}.")
        token = new_access_token(scopes, self.config.token_ttl_s)
        await self.oauth.store_token(client, token)
        return _json(
            {
                "access_token": token.token,
                "token_type": "Bearer",
                "expires_in": token.expires_in,
                "scope": " ".join(token.scopes),
            },
            headers={"cache-control": "no-store", "pragma": "no-cache"},
        )

    async def create(self, request: Request) -> Response:
        """A job from an uploaded file (streamed to storage) or from a URL a worker fetches."""
        caller = await self._caller(request, SCOPE_WRITE)
        limit = self.config.max_upload_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit + MULTIPART_OVERHEAD_BYTES:
            raise _too_large(limit)
        jobs = self.jobs
        client = caller.client
        job = await jobs.create(
            client=client.id, organisation=client.organisation, priority=client.priority
        )
        try:
            form = await self._receive(request, job.id)
            options, url = await self._checked(form)
        except BaseException as error:  # refused or abandoned: the job never existed
            await asyncio.shield(self._forget(job.id))
            if isinstance(error, UploadTooLarge):
                raise _too_large(limit) from None
            if isinstance(error, FormError):
                raise invalid_request(str(error), param=error.param) from None
            if isinstance(error, ClientDisconnect):
                return Response(status_code=400)
            raise
        if url is not None:
            self.storage.delete(job.id)
        await jobs.upload_finished(
            job.id,
            options,
            media_bytes=form.file_bytes if url is None else None,
            media_name=form.file_name,
            source_url=url,
        )
        return _json(await self._document(jobs, job.id), status=201)

    async def list_jobs(self, request: Request) -> Response:
        caller = await self._caller(request, SCOPE_READ)
        limit_text = request.query_params.get("limit", "20")
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= 100:
            raise invalid_request("limit must be an integer from 1 to 100.", param="limit")
        limit = int(limit_text)
        found = await self.jobs.list(
            client=caller.client.id, limit=limit + 1, before=request.query_params.get("before")
        )
        return _json(
            {
                "object": "list",
                "data": [_summary(job) for job in found[:limit]],
                "has_more": len(found) > limit,
            }
        )

    async def show(self, request: Request) -> Response:
        caller = await self._caller(request, SCOPE_READ)
        job = await self._own_job(request, caller)
        return _json(await self._document(self.jobs, job.id))

    async def delete(self, request: Request) -> Response:
        caller = await self._caller(request, SCOPE_WRITE)
        job_id = request.path_params["job_id"]
        if not await self.jobs.delete(job_id, client=caller.client.id):
            raise _no_job(job_id)
        self.storage.delete(job_id)
        return _json({"id": job_id, "object": "transcription.job", "deleted": True})

    async def result(self, request: Request) -> Response:
        """The transcript (or a translation) as JSON, WebVTT, SRT or plain text."""
        caller = await self._caller(request, SCOPE_READ)
        job = await self._own_job(request, caller)
        fmt = request.query_params.get("format", "json")
        if fmt not in RESULT_FORMATS:
            raise invalid_request(
                f"format must be one of {', '.join(RESULT_FORMATS)}.", param="format"
            )
        if job.state != JobState.SUCCESS:
            raise ApiError(
                409,
                f"The job is {job.state}; results are available once it is SUCCESS.",
                type="invalid_request_error",
                code="job_not_finished",
            )
        language = request.query_params.get("language")
        assert job.transcript is not None
        original = str(job.transcript["language"])
        if language is not None and language != original and language not in job.translations:
            raise not_found(
                f"No transcript in '{language}': available are "
                f"{', '.join([original, *job.translations])}.",
                param="language",
                code="language_not_available",
            )
        transcript = loaded(job, None if language in (None, original) else language)
        name, media_type, extension = RESULT_FORMATS[fmt]
        text = render(transcript, name)
        if fmt == "json":
            document = orjson.loads(text)
            document["enrichment"] = job.enrichment
            document["translations"] = sorted(job.translations)
            text = orjson.dumps(document).decode()
        filename = f"{job.id}.{transcript.language}.{extension}"
        return Response(
            text,
            media_type=media_type,
            headers={"content-disposition": f'attachment; filename="{filename}"'},
        )

    async def _receive(self, request: Request, job_id: str) -> StreamingForm:
        path = self.storage.prepare(job_id)
        with path.open("wb") as sink:
            form = StreamingForm(
                request.headers.get("content-type"), sink, self.config.max_upload_bytes
            )
            async for chunk in request.stream():
                if chunk:
                    await asyncio.to_thread(form.feed, chunk)
            form.finish()
        return form

    async def _checked(self, form: StreamingForm) -> tuple[JobOptions, str | None]:
        try:
            options = JobOptions.model_validate_json(form.fields.get("options") or "{}")
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "options"
            raise FormError(f"Invalid options: {where}: {first['msg']}.", param="options") from None
        url = (form.fields.get("url") or "").strip() or None
        if form.has_file == (url is not None):
            raise FormError("Send either a `file` or a `url`, not both and not neither.")
        if form.has_file and form.file_bytes == 0:
            raise FormError("The uploaded file is empty.", param="file")
        if url is not None:
            try:
                await check_url(url, allow_private=self.config.allow_private_urls)
            except UrlRefused as refused:
                raise FormError(str(refused), param="url") from None
        if options.callback_url is not None:
            try:
                await check_url(
                    str(options.callback_url), allow_private=self.config.allow_private_urls
                )
            except UrlRefused as refused:
                raise FormError(f"callback_url: {refused}", param="options") from None
        return options, url

    async def _forget(self, job_id: str) -> None:
        self.storage.delete(job_id)
        await self.jobs.discard(job_id)

    async def _caller(self, request: Request, scope: str) -> Caller:
        authorization = request.headers.get("authorization") or ""
        kind, _, token = authorization.partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            raise unauthorized(
                "Send an access token from POST /oauth/token as 'Authorization: Bearer TOKEN'.",
                code="missing_access_token",
            )
        caller = await self.oauth.caller(token.strip())
        if caller is None:
            raise unauthorized("The access token is unknown or expired.", code="invalid_token")
        if not caller.may(scope):
            raise forbidden(f"This token lacks the scope '{scope}'.", code="insufficient_scope")
        return caller

    async def _own_job(self, request: Request, caller: Caller) -> JobRecord:
        job_id = request.path_params["job_id"]
        job = await self.jobs.get(job_id, client=caller.client.id)
        if job is None:
            raise _no_job(job_id)
        return job

    async def _document(self, jobs: JobRepository, job_id: str) -> dict[str, Any]:
        job = await jobs.get(job_id)
        if job is None:
            raise _no_job(job_id)
        document = _summary(job)
        document["history"] = [
            {"state": str(event.state), "at": event.at.isoformat(), "detail": event.detail}
            for event in await jobs.events(job_id)
        ]
        document["webhooks"] = [
            {
                "event": delivery.event,
                "url": delivery.url,
                "idempotency_key": delivery.idempotency_key,
                "status": delivery.status,
                "attempts": delivery.log,
            }
            for delivery in await jobs.deliveries(job_id)
        ]
        if job.state == JobState.SUCCESS and job.transcript is not None:
            document["result"] = {
                "language": job.transcript["language"],
                "duration": job.transcript["duration"],
                "translations": sorted(job.translations),
                "enrichment": job.enrichment,
            }
        return document


def _summary(job: JobRecord) -> dict[str, Any]:
    return {
        "id": job.id,
        "object": "transcription.job",
        "state": str(job.state),
        "priority": job.priority,
        "options": job.options.model_dump(mode="json"),
        "source": {"url": job.source_url, "filename": job.media_name, "bytes": job.media_bytes},
        "attempts": job.attempts,
        "failed_step": job.failed_step,
        "failure_cause": job.failure_cause,
        "created_at": job.created_at.isoformat(),
        "updated_at": job.updated_at.isoformat(),
    }


def _no_job(job_id: str) -> ApiError:
    return not_found(f"No transcription job '{job_id}'.", param="job_id", code="job_not_found")


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"The file is larger than the limit of {limit} bytes.",
        type="invalid_request_error",
        param="file",
        code="file_too_large",
    )


def _basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    """client_secret_basic (RFC 6749 §2.3.1): `Basic base64(id:secret)`, if that was sent."""
    kind, _, encoded = (authorization or "").partition(" ")
    if kind.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    client_id, sep, secret = decoded.partition(":")
    return (client_id, secret) if sep else None


def _oauth_error(status: int, error: str, description: str) -> Response:
    headers = {"cache-control": "no-store"}
    if status == 401:
        headers["www-authenticate"] = 'Basic realm="aiguillage"'
    return _json({"error": error, "error_description": description}, status, headers)


def _json(document: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(document), status_code=status, media_type="application/json", headers=headers
    )
