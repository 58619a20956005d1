"""kiln's OpenAI-compatible HTTP API over an ``AsyncEngine``: FastAPI routes, errors, streaming.

Routes: POST /v1/completions, POST /v1/chat/completions (JSON, or server-sent events with
``"stream": true``), GET /v1/models, GET /health, GET /metrics (Prometheus text).

The life of a request: the gate checks the API key (/v1/ routes only) and the body size; FastAPI parses
the body into a ``protocol`` model; the handler checks the model name and refused fields, turns the
prompt (or the rendered chat) into token ids, builds ``SamplingParams`` and the grammar, and submits a
``Request``. The engine validates it synchronously (context window, token ids, n), then streams
``RequestOutput``s; the handler either forwards them as SSE chunks or gathers them into one response.
A stream whose client goes away is aborted, so its KV pages are freed within a step.

Every error is an OpenAI error object ``{"error": {"message", "type", "param", "code"}}``: RequestError
(a bad value anywhere below) and validation errors are 400, never FastAPI's 422.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from ..byte_level import CHAR_BYTES
from ..errors import RequestError
from ..runtime.chat_template import encode_chat, render_chat
from ..runtime.engine import AsyncEngine, RequestStream
from ..runtime.grammar import ResponseFormat
from ..runtime.outputs import Request as EngineRequest
from ..runtime.outputs import CompletionOutput, RequestOutput, TokenLogprob
from ..runtime.tokenizer import Tokenizer
from .metrics import RequestTimer, ServerMetrics
from .protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChatDelta, ChatLogprobs, ChatResponseMessage, ChatTokenLogprob,
                       CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, ErrorInfo,
                       ErrorResponse, ModelCard, ModelList, PromptTokensDetails, TopLogprob, Usage,
                       GenerationRequest)

log = logging.getLogger("kiln.server")


@dataclass(frozen=True)
class ServerConfig:
    max_body_bytes: int = 4 << 20  # a larger request body is refused with 413
    max_default_tokens: int = 4096  # max_tokens when a request omits it: the rest of the context, at most this


class APIError(HTTPException):
    """An HTTP error answered with an OpenAI error object. (An HTTPException, so that FastAPI passes it
    through unchanged when it is raised while the body is read.)"""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(status, message, headers)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


def build_app(engine: AsyncEngine, *, api_key: str | None = None, config: ServerConfig = ServerConfig()) -> FastAPI:
    """The FastAPI app serving ``engine``. The app owns the engine: it shuts it down when the app's
    lifespan ends (the uvicorn server stops). ``api_key`` set: /v1/ routes need ``Authorization: Bearer
    <api_key>``; /health and /metrics stay open."""
    server = _OpenAIServer(engine, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await engine.shutdown()

    app = FastAPI(title="kiln", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(_RequestGate, api_key=api_key, max_body_bytes=config.max_body_bytes)
    _install_error_handlers(app)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request):
        return await server.completions(body, request)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await server.chat_completions(body, request)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[server.model_card])

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


# -- errors ------------------------------------------------------------------------------------------


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response()

    request_fields = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError):
        # kiln's messages about one field start with its name ("top_p must be in (0, 1], got 0")
        word = re.match(r"[a-z_]*", str(e)).group()
        return APIError(400, str(e), param=word if word in request_fields else None).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        message, param = _describe_validation_errors(e.errors())
        return APIError(400, message, param=param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        message = f"{e.detail}: {request.method} {request.url.path}"
        return APIError(e.status_code, message, headers=e.headers).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return APIError(500, f"internal error ({type(e).__name__}); the server keeps running",
                        type="server_error").response()


def _describe_validation_errors(errors) -> tuple[str, str | None]:
    """One message and the offending parameter for pydantic's list of errors. A union's alternatives
    each report an error (their locations end in the alternative's type name): the parameter is the
    location they share."""
    if not errors:
        return "invalid request body", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})", None
    locs = [tuple(x for x in err.get("loc", ()) if x != "body") for err in errors]
    common = locs[0]
    for loc in locs[1:]:
        n = 0
        while n < min(len(common), len(loc)) and common[n] == loc[n]:
            n += 1
        common = common[:n]
    param = ".".join(str(x) for x in common) or None
    if first.get("type") == "missing":
        return f"'{param}' is required", param
    if len(errors) == 1 or not param:
        where = ".".join(str(x) for x in locs[0])
        return (f"{where}: {first.get('msg')}" if where else first.get("msg", "invalid request body")), param
    return f"{param}: has the wrong type or value ({first.get('msg')})", param


class _RequestGate:
    """Before routing: the API key for /v1/ routes (401) and the body-size limit (413), as error objects."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if self.api_key is not None and scope["path"].startswith("/v1/"):
            auth = headers.get("authorization", "")
            given = auth[7:] if auth[:7].lower() == "bearer " else None
            if given is None or not secrets.compare_digest(given.encode(), self.api_key.encode()):
                msg = "no API key given (send 'Authorization: Bearer <key>')" if given is None else "wrong API key"
                err = APIError(401, msg, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await err.response()(scope, receive, send)
        length = headers.get("content-length", "")
        too_large = APIError(413, f"the request body is larger than {self.max_body_bytes} bytes",
                             code="request_too_large")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await too_large.response()(scope, receive, send)
        received = 0

        async def receive_limited():  # a body sent without a Content-Length is counted as it arrives
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise too_large  # FastAPI is reading the body: the APIError handler answers
            return message

        await self.app(scope, receive_limited, send)


# -- the endpoints -----------------------------------------------------------------------------------


@dataclass
class _Choice:
    """One choice of a non-streamed response, gathered over the request's outputs."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


class _OpenAIServer:
    def __init__(self, engine: AsyncEngine, config: ServerConfig):
        self.engine, self.config = engine, config
        self.tokenizer: Tokenizer = engine.tokenizer
        self.model_name: str = engine.model_name
        self.context_len: int = engine.context_len
        self.max_seq_len = engine.max_sequence_tokens  # what one sequence can hold
        self.model_card = ModelCard(id=self.model_name, created=int(time.time()), max_model_len=self.context_len)
        self.metrics = ServerMetrics(engine.stats)
        self.tokens = _TokenStrings(self.tokenizer)

    # -- /v1/completions

    async def completions(self, body: CompletionRequest, request: Request):
        self._check_common(body)
        prompt = body.single_prompt()
        if prompt is None:
            raise APIError(400, "one prompt per request: send a string or a list of token ids", param="prompt")
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        rid, stream = await self._submit(body, prompt_ids, "cmpl")
        timer = self.metrics.timer()
        if body.stream:
            return _EventStream(self._completion_events(rid, body, stream, timer))
        outputs = await self._gather(stream, request, timer)
        choices = self._merge(outputs, body.n)
        return CompletionResponse(
            id=rid, created=int(time.time()), model=self.model_name, usage=_usage(outputs),
            choices=[CompletionChoice(index=i, text="".join(c.text), finish_reason=c.finish_reason,
                                      logprobs=self._completion_logprobs(c.logprobs, 0)
                                      if body.logprobs is not None else None)
                     for i, c in enumerate(choices)])

    async def _completion_events(self, rid: str, body: CompletionRequest, stream: RequestStream,
                                 timer: RequestTimer) -> AsyncIterator[str]:
        created = int(time.time())
        offsets = [0] * body.n  # text_offset of each choice's next token
        outputs = []
        try:
            async for out in stream:
                timer.output(out)
                outputs.append(out)
                choices = []
                for o in filter(_has_news, out.outputs):
                    lps = None
                    if o.logprobs is not None:
                        lps = self._completion_logprobs(o.logprobs, offsets[o.index])
                        offsets[o.index] += sum(len(t) for t in lps.tokens)
                    choices.append(CompletionChoice(index=o.index, text=o.text, logprobs=lps,
                                                    finish_reason=o.finish_reason))
                if choices:
                    yield _sse(CompletionResponse(id=rid, created=created, model=self.model_name, choices=choices))
            timer.finish()
            if body.include_usage:
                yield _sse(CompletionResponse(id=rid, created=created, model=self.model_name, choices=[],
                                              usage=_usage(outputs)))
        except Exception as e:  # headers are sent: report in the stream, then end it
            yield _sse(_stream_error(e))
        finally:
            stream.abort()  # no-op once finished; a client gone mid-stream frees its request's KV here
        yield "data: [DONE]\n\n"

    # -- /v1/chat/completions

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self._check_common(body)
        text = render_chat(self.tokenizer, [m.for_template() for m in body.messages])
        rid, stream = await self._submit(body, encode_chat(self.tokenizer, text), "chatcmpl")
        timer = self.metrics.timer()
        if body.stream:
            return _EventStream(self._chat_events(rid, body, stream, timer))
        outputs = await self._gather(stream, request, timer)
        choices = self._merge(outputs, body.n)
        return ChatCompletionResponse(
            id=rid, created=int(time.time()), model=self.model_name, usage=_usage(outputs),
            choices=[ChatChoice(index=i, message=ChatResponseMessage(content="".join(c.text)),
                                finish_reason=c.finish_reason,
                                logprobs=ChatLogprobs(content=self._chat_logprobs(c.logprobs)) if body.logprobs
                                else None)
                     for i, c in enumerate(choices)])

    async def _chat_events(self, rid: str, body: ChatCompletionRequest, stream: RequestStream,
                           timer: RequestTimer) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices, usage=None) -> str:
            return _sse(ChatCompletionChunk(id=rid, created=created, model=self.model_name, choices=choices,
                                            usage=usage))

        outputs = []
        try:
            yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                         for i in range(body.n)])
            async for out in stream:
                timer.output(out)
                outputs.append(out)
                choices = [ChatChunkChoice(index=o.index, delta=ChatDelta(content=o.text),
                                           finish_reason=o.finish_reason,
                                           logprobs=ChatLogprobs(content=self._chat_logprobs(o.logprobs))
                                           if o.logprobs is not None else None)
                           for o in filter(_has_news, out.outputs)]
                if choices:
                    yield chunk(choices)
            timer.finish()
            if body.include_usage:
                yield chunk([], _usage(outputs))
        except Exception as e:  # headers are sent: report in the stream, then end it
            yield _sse(_stream_error(e))
        finally:
            stream.abort()  # no-op once finished; a client gone mid-stream frees its request's KV here
        yield "data: [DONE]\n\n"

    # -- shared steps

    def _check_common(self, body: GenerationRequest) -> None:
        if body.model != self.model_name:
            raise APIError(404, f"the model '{body.model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")
        refused = body.unsupported()
        if refused is not None:
            param, message = refused
            raise APIError(400, message, param=param, code="unsupported_parameter")

    async def _submit(self, body: GenerationRequest, prompt_ids: list[int], prefix: str) -> tuple[str, RequestStream]:
        """Build and submit the engine request; RequestError (-> 400) for anything the engine refuses."""
        # max_tokens by default: what is left of the context window (and of the KV cache), capped
        default_max_tokens = max(1, min(self.max_seq_len - len(prompt_ids), self.config.max_default_tokens))
        params = body.sampling_params(default_max_tokens)
        grammar = None
        if body.response_format is not None:
            fmt = ResponseFormat.from_openai(body.response_format)
            # compiling can take a while: off the event loop, which serves the other streams meanwhile
            grammar = await asyncio.to_thread(self.engine.compile_grammar, fmt)
        rid = f"{prefix}-{uuid.uuid4().hex}"
        stream = self.engine.submit(EngineRequest(rid, prompt_ids, params, user=body.user, grammar=grammar))
        return rid, stream

    async def _gather(self, stream: RequestStream, request: Request, timer: RequestTimer) -> list[RequestOutput]:
        """Every output of a non-streamed request; aborts it if the client disconnects meanwhile."""

        async def abort_on_disconnect():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            stream.abort()

        watcher = asyncio.create_task(abort_on_disconnect())
        try:
            outputs = []
            async for out in stream:
                timer.output(out)
                outputs.append(out)
            timer.finish()
            return outputs
        finally:
            watcher.cancel()
            stream.abort()  # no-op once finished

    @staticmethod
    def _merge(outputs: list[RequestOutput], n: int) -> list[_Choice]:
        choices = [_Choice() for _ in range(n)]
        for out in outputs:
            for o in out.outputs:
                c = choices[o.index]
                c.text.append(o.text)
                c.logprobs.extend(o.logprobs or ())
                c.finish_reason = o.finish_reason or c.finish_reason
        return choices

    def _completion_logprobs(self, lps: list[TokenLogprob], offset: int) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for lp in lps:
            token = self.tokens.text(lp.token_id)
            out.tokens.append(token)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({self.tokens.text(t): v for t, v in lp.top})
            out.text_offset.append(offset)
            offset += len(token)
        return out

    def _chat_logprobs(self, lps: list[TokenLogprob]) -> list[ChatTokenLogprob]:
        t = self.tokens
        return [ChatTokenLogprob(token=t.text(lp.token_id), logprob=lp.logprob, bytes=t.bytes(lp.token_id),
                                 top_logprobs=[TopLogprob(token=t.text(i), logprob=v, bytes=t.bytes(i))
                                               for i, v in lp.top])
                for lp in lps]


def _has_news(o: CompletionOutput) -> bool:
    """Worth a chunk: tokens whose text is still held back (a possible stop string) are not, unless
    their logprobs are asked for."""
    return bool(o.text or o.finish_reason or o.logprobs)


def _usage(outputs: list[RequestOutput]) -> Usage:
    last = outputs[-1] if outputs else None
    prompt = last.prompt_tokens if last else 0
    completion = sum(len(o.token_ids) for out in outputs for o in out.outputs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=last.cached_tokens if last else 0))


def _sse(obj: BaseModel) -> str:
    return f"data: {obj.model_dump_json()}\n\n"


def _stream_error(e: Exception) -> ErrorResponse:
    if isinstance(e, RequestError):
        return ErrorResponse(error=ErrorInfo(message=str(e), type="invalid_request_error"))
    log.exception("unexpected error while streaming")
    return ErrorResponse(error=ErrorInfo(message=f"internal error ({type(e).__name__})", type="server_error"))


class _EventStream(StreamingResponse):
    """Server-sent events whose generator is closed however the response ends. Starlette cancels a
    stream whose client disconnected; closing the generator then runs its ``finally`` (the abort) now,
    not whenever the garbage collector gets to it."""

    def __init__(self, events: AsyncIterator[str]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


# -- token strings for logprobs ----------------------------------------------------------------------


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class _TokenStrings:
    """A token's text and UTF-8 bytes, as OpenAI's logprobs show them (cached: the vocabulary is small).
    A token ending inside a multi-byte character has U+FFFD in its text but its true bytes in ``bytes``."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}

    def text(self, token_id: int) -> str:
        s = self._text.get(token_id)
        if s is None:
            s = self._text[token_id] = self.tokenizer.decode_token(token_id)
        return s

    def bytes(self, token_id: int) -> list[int]:
        b = self._bytes.get(token_id)
        if b is None:
            b = self._bytes[token_id] = self._raw_bytes(token_id)
        return b

    def _raw_bytes(self, token_id: int) -> list[int]:
        text = self.text(token_id)
        piece = self.tokenizer.id_to_token(token_id) or ""
        if "\ufffd" in text:  # part of a character: read the bytes off the vocabulary entry
            if m := _BYTE_FALLBACK.fullmatch(piece):  # SentencePiece byte fallback
                return [int(m.group(1), 16)]
            if piece and all(c in CHAR_BYTES for c in piece):  # byte-level BPE
                return [CHAR_BYTES[c] for c in piece]
        return list(text.encode())
