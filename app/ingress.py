"""The OpenAI-compatible HTTP ingress (FastAPI under Ray Serve): stateless, autoscaled.

One pipeline serves both generation routes: authenticate, read the body within its size
limit, parse it (bounded nesting), bound the work it asks for (app/bounds.py), validate,
tokenize (off the event loop), submit one controller request per choice (`n` per prompt,
derived seeds), wait for admission, then run the choices to the end or stream them
(app/streaming.py) from their request streams (app/group_stream.py: one subscription per
controller replica carries the tokens of all of this ingress's requests) and render the answer in the route's shape (app/renderers.py). It never
imports torch. Every error leaves in OpenAI's envelope (see app/errors.py); an unexpected
one names only its class and a request id, the details go to the log.
"""

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from esp_core.tokenizer import load_tokenizer
from esp_serve.app.bounds import check_work, parse_body
from esp_serve.app.choices import Choice, Delta
from esp_serve.app.config import load_config, read_api_keys
from esp_serve.app.errors import (
    APIError,
    bad_request,
    body_too_large,
    from_validation_error,
    internal_error,
    model_not_found,
    unauthorized,
)
from esp_serve.app.group_stream import GroupStreams
from esp_serve.app.openai_models import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from esp_serve.app.protocol import Admission, GenerateRequest, ModelInfo
from esp_serve.app.renderers import ChatRenderer, CompletionRenderer
from esp_serve.app.requests import (
    Limits,
    SubRequest,
    chat_prompt_ids,
    chat_sub_requests,
    check_chat,
    check_token_ids,
    client_template_prompt,
    completion_sub_requests,
    with_block_hashes,
)
from esp_serve.app.streaming import (
    StreamUsage,
    cached_tokens,
    cancel_all,
    dumps,
    run_to_end,
    sse_body,
    usage,
)
from esp_serve.app.telemetry import RequestSpan, Tracing, TracingConfig, carrier_from_headers

log = logging.getLogger("ray.serve")

_STARTED = int(time.time())


class _JSON(JSONResponse):
    """JSON answers that never hold NaN/Infinity (invalid JSON)."""

    def render(self, content: Any) -> bytes:
        return dumps(content).encode("utf-8")


class _SSE(StreamingResponse):
    """An SSE answer that owns its request streams (app/group_stream.py): they are cancelled when the
    response ends however it ends, even if the body never started (a client that hung
    up before the first byte would otherwise leave its generations running)."""

    def __init__(self, body: Any, gens: list[Any]) -> None:
        super().__init__(body, media_type="text/event-stream")
        self._gens = gens

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            cancel_all(self._gens)


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@dataclass(frozen=True)
class _Route:
    """What differs between the two generation routes."""

    request_model: type
    renderer: type
    plan: Any  # (req, tokenizer, limits) -> (sub-requests, prompt ids)
    default_max_tokens: str  # the ServerSection key
    max_tokens_of: Any  # req -> requested max tokens


_COMPLETIONS = _Route(
    CompletionRequest,
    CompletionRenderer,
    completion_sub_requests,
    "default_max_tokens_completion",
    lambda req: req.max_tokens,
)
_CHAT = _Route(
    ChatCompletionRequest,
    ChatRenderer,
    chat_sub_requests,
    "default_max_tokens_chat",
    lambda req: req.requested_max_tokens,
)


class OpenAIIngress:
    """The deployment class (wrapped with serve.deployment/serve.ingress in app/builder.py)."""

    def __init__(self, config: dict[str, Any], controller: Any) -> None:
        self.cfg = load_config(config)
        self.controller = controller
        self.groups = GroupStreams(controller)
        self.tokenizer = load_tokenizer(self.cfg.model.tokenizer_path)
        self.api_keys = read_api_keys(self.cfg.server)
        self._info: ModelInfo | None = None
        self._info_lock = asyncio.Lock()
        # a gen_ai span per completion request (off unless telemetry.tracing says)
        self.tracing = Tracing(TracingConfig.from_section(self.cfg.telemetry), component="ingress")
        if not self.api_keys:
            log.warning(
                "no API keys configured (%s / %s): authentication is off",
                self.cfg.server.api_keys_env,
                self.cfg.server.api_keys_file,
            )

    # ------------------------------------------------------------------ plumbing

    async def info(self) -> ModelInfo:
        if self._info is None:
            async with self._info_lock:
                if self._info is None:
                    self._info = await self.controller.model_info.remote()
        return self._info

    def _auth(self, request: Request) -> None:
        if not self.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in self.api_keys:
            raise unauthorized()

    async def _json(self, request: Request, model_cls: type) -> Any:
        """Authenticate, read the body within the size limit, parse and validate it."""
        self._auth(request)
        info = await self.info()
        limit = self.cfg.server.body_limit(info.max_model_len)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise body_too_large(limit)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise body_too_large(limit)
        data = parse_body(bytes(body), self.cfg.limits)
        check_work(data, self.cfg.limits)
        try:
            return model_cls.model_validate(data)
        except ValidationError as err:
            raise from_validation_error(err, max_details=self.cfg.limits.max_error_details) from None

    def _limits(self, info: ModelInfo, default_max_tokens: int | None) -> Limits:
        return Limits(
            info, default_max_tokens, self.cfg.server.max_n, self.cfg.server.max_logprobs, self.cfg.limits
        )

    def _start_span(
        self, request: Request, operation: str, info: ModelInfo, req: Any, max_tokens: int | None
    ) -> tuple[RequestSpan, dict[str, str], str]:
        """The request's span (child of the client's traceparent) and the trace context
        to send to the controller: the span's, or with tracing off here the client's own
        traceparent unchanged (so a tracing controller still joins the client's trace),
        and the response id (the span's gen_ai.response.id)."""
        rid = f"{'chatcmpl' if operation == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        rs = self.tracing.start_request(
            request.headers,
            operation=operation,
            model=info.served_name,
            request_id=rid,
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stream=bool(req.stream),
        )
        return rs, (rs.carrier() or carrier_from_headers(request.headers)), rid

    @staticmethod
    async def _traced(rs: RequestSpan, answer: Any) -> Response:
        """Await the route's answer; an error before the response (a refusal, a failed
        generation) ends the span as failed. Streams end their span themselves."""
        try:
            return await answer
        except APIError as err:
            rs.fail(err.code or err.type, err.message)
            raise
        except BaseException as err:
            rs.fail(type(err).__name__, str(err))
            raise

    async def _open(self, subs: list[SubRequest], trace_context: dict[str, str] | None = None) -> list[Any]:
        """Submit one controller request per choice; wait for their admissions (within
        limits.admission_timeout_s). Any refusal (queue full, context too long) or failure
        cancels every request and becomes the HTTP error. A choice names its prompt's
        first choice as the sibling whose prompt KV it shares (n > 1)."""
        base = uuid.uuid4().hex
        rids = {s.index: f"{base}-{s.index}" for s in subs}
        submits = [
            self.groups.submit(
                GenerateRequest(
                    rids[s.index],
                    s.prompt_ids,
                    s.sampling,
                    trace_context=trace_context or None,
                    block_hashes=s.block_hashes,
                    prefill_after=rids[s.sibling] if s.sibling is not None else "",
                )
            )
            for s in subs
        ]
        try:
            answers = await asyncio.wait_for(
                asyncio.gather(*submits, return_exceptions=True), self.cfg.limits.admission_timeout_s
            )
        except asyncio.TimeoutError:  # each submit cancels its request once admitted
            raise APIError(
                503,
                "the request was not admitted in time (limits.admission_timeout_s); retry later",
                type="server_error",
                code="admission_timeout",
                headers={"Retry-After": str(self.cfg.server.retry_after_s)},
            ) from None
        gens = [a[1] for a in answers if not isinstance(a, BaseException)]
        failures = [a for a in answers if isinstance(a, BaseException)]
        if failures:
            cancel_all(gens)
            raise failures[0]
        admissions: list[Admission] = [a[0] for a in answers]
        refused = [a for a in admissions if not a.accepted]
        if refused:
            cancel_all(gens)
            a = refused[0]
            headers = {"Retry-After": str(a.retry_after_s)} if a.retry_after_s else {}
            kind = "server_error" if a.status >= 500 else "invalid_request_error"
            raise APIError(a.status, a.message, type=kind, code=a.code, headers=headers)
        return gens

    # ------------------------------------------------------------------ routes

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve calls this after the constructor: the routes are closures over self."""
        return build_api(self)

    async def health(self, request: Request) -> Response:
        try:
            await asyncio.wait_for(self.controller.health.remote(), 10)
        except Exception as err:  # noqa: BLE001 - any failure means unhealthy
            log.warning("health check failed: %r", err)
            return _error_response(APIError(503, "unhealthy", type="server_error", code="unhealthy"))
        return Response(status_code=200)

    async def list_models(self, request: Request) -> JSONResponse:
        self._auth(request)
        return JSONResponse({"object": "list", "data": [self._model_card(await self.info())]})

    async def get_model(self, request: Request) -> JSONResponse:
        model = request.path_params["model"]
        self._auth(request)
        info = await self.info()
        if model != info.served_name:
            raise model_not_found(model)
        return JSONResponse(self._model_card(info))

    def _model_card(self, info: ModelInfo) -> dict[str, Any]:
        return {
            "id": info.served_name,
            "object": "model",
            "created": _STARTED,
            "owned_by": "esp-serve",
            "root": info.served_name,
            "max_model_len": info.max_model_len,
        }

    async def esp_status(self, request: Request) -> JSONResponse:
        """Per-instance KV slots as the instances report them (tests check the pool is
        fully free after cancellations) and the prefix cache's share of them, plus the
        scheduler's view and queue sizes."""
        self._auth(request)
        st = await asyncio.wait_for(self.controller.status.remote(), 30)
        return JSONResponse(
            {
                "instances": [
                    {
                        "instance": k.instance,
                        "free_slots": k.free_slots,
                        "total_slots": k.total_slots,
                        "cached_tokens": st.cached_on(k.instance),
                    }
                    for k in st.instances
                ],
                "scheduler_free_slots": list(st.scheduler_free_slots),
                "waiting": st.waiting,
                "running": st.running,
                "fully_free": st.fully_free,
                **st.extra,
            }
        )

    async def tokenize(self, request: Request) -> JSONResponse:
        req: TokenizeRequest = await self._json(request, TokenizeRequest)
        info = await self.info()
        if req.model is not None and req.model != info.served_name:
            raise model_not_found(req.model)
        if req.prompt is not None:
            ids = await asyncio.to_thread(self.tokenizer.encode, req.prompt, req.add_special_tokens)
        else:
            ids = await asyncio.to_thread(chat_prompt_ids, req, self.tokenizer)
        strs = [self.tokenizer.id_to_token(t) for t in ids] if req.return_token_strs else None
        return JSONResponse(
            {"count": len(ids), "max_model_len": info.max_model_len, "tokens": ids, "token_strs": strs}
        )

    async def detokenize(self, request: Request) -> JSONResponse:
        req: DetokenizeRequest = await self._json(request, DetokenizeRequest)
        info = await self.info()
        if req.model is not None and req.model != info.served_name:
            raise model_not_found(req.model)
        check_token_ids(req.tokens, info.vocab_size, "tokens")
        return JSONResponse({"prompt": await asyncio.to_thread(self.tokenizer.decode, req.tokens)})

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, _COMPLETIONS)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, _CHAT)

    # ------------------------------------------------------------------ the pipeline

    async def _generate(self, request: Request, route: _Route) -> Response:
        """Parse, bound and validate the body, then trace the rest of the request."""
        req = await self._json(request, route.request_model)
        info = await self.info()
        rs, carrier, rid = self._start_span(
            request, route.renderer.operation, info, req, route.max_tokens_of(req)
        )
        return await self._traced(rs, self._answer(req, route, info, rs, carrier, rid))

    async def _answer(
        self, req: Any, route: _Route, info: ModelInfo, rs: RequestSpan, carrier: dict[str, str], rid: str
    ) -> Response:
        """Tokenize (off the event loop), admit, generate, render. From admission on, the
        request streams belong to `run_to_end`/`sse_body`, which cancel them on every
        way out; until then, to this function."""
        limits = self._limits(info, getattr(self.cfg.server, route.default_max_tokens))
        subs, prompts = await self._plan(req, route, limits)
        prompt_tokens = sum(len(p) for p in prompts)
        rs.set_input_tokens(prompt_tokens)
        renderer = route.renderer(req, self.tokenizer, subs)
        choices = [
            Choice(
                s.index,
                self.tokenizer,
                s.prompt_ids,
                req.stop,
                req.skip_special_tokens,
                bool(renderer.want_logprobs),
                req.return_tokens_as_token_ids,
                prompt_index=s.prompt_index,
            )
            for s in subs
        ]
        head = {"id": rid, "object": renderer.object, "created": int(time.time()), "model": info.served_name}
        timeout_s = self.cfg.server.request_timeout_s
        gens = await self._open(subs, carrier)
        if req.stream:
            return self._stream(gens, choices, renderer, head, req, rs, prompt_tokens)
        await run_to_end(gens, choices, rs, prompt_tokens, timeout_s, rid)
        output_tokens = sum(c.num_output_tokens for c in choices)
        return _JSON(
            {
                **head,
                "choices": [renderer.final(c) for c in choices],
                "usage": usage(prompt_tokens, output_tokens, cached_tokens(choices)),
            }
        )

    def _stream(self, gens, choices, renderer, head, req, rs, prompt_tokens) -> StreamingResponse:
        stream_usage = StreamUsage(req.stream_options, head, prompt_tokens, choices)

        def chunks(d: Delta | None):
            entries = renderer.opening(choices) if d is None else [renderer.chunk(d)]
            return [{**head, "choices": [e], **stream_usage.field()} for e in entries]

        try:
            body = sse_body(
                gens,
                choices,
                chunks,
                stream_usage.final_chunk,
                rs,
                prompt_tokens,
                self.cfg.server.request_timeout_s,
                head["id"],
            )
            return _SSE(body, gens)
        except BaseException:
            cancel_all(gens)
            raise

    async def _plan(
        self, req: Any, route: _Route, limits: Limits
    ) -> tuple[list[SubRequest], list[list[int]]]:
        """Validate against the model, tokenize and hash the prompts' blocks, in a worker
        thread: a long prompt or a heavy template must not stall the event loop other
        requests are served from (and hashing here, once, keeps it off every group's
        engine loop)."""
        kwargs = getattr(req, "chat_template_kwargs", None) or {}
        if "chat_template" in kwargs:
            check_chat(req, limits)  # cheap refusals before the expensive render
            ids = await client_template_prompt(req, self.tokenizer, self.cfg.limits)
            return await asyncio.to_thread(self._hashed, chat_sub_requests, req, limits, ids)
        return await asyncio.to_thread(self._hashed, route.plan, req, limits)

    def _hashed(self, plan: Any, req: Any, limits: Limits, *ids: list[int]):
        subs, prompts = plan(req, self.tokenizer, limits, *ids)
        if self.cfg.prefix_cache.enabled:
            subs = with_block_hashes(subs, self.cfg.prefix_cache.block_tokens)
        return subs, prompts


def build_api(ingress: OpenAIIngress) -> FastAPI:
    """The FastAPI app of one ingress replica: routes bound to its methods, and exception
    handlers that put every error (ours, FastAPI's, Starlette's, unexpected ones) in
    OpenAI's envelope."""
    api = FastAPI(title="esp-serve", docs_url=None, redoc_url=None, openapi_url=None)

    @api.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return _error_response(err)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        return _error_response(bad_request(str(first.get("msg", err))))

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return _error_response(APIError(err.status_code, str(err.detail), code=code))

    @api.exception_handler(Exception)
    async def _internal_error(_: Request, err: Exception) -> JSONResponse:
        error_id = f"err-{uuid.uuid4().hex[:16]}"
        log.error("internal error %s: %r", error_id, err, exc_info=err)
        return _error_response(
            internal_error(f"Internal server error: {type(err).__name__} (error id {error_id})")
        )

    routes = [
        ("GET", "/health", ingress.health),
        ("GET", "/v1/models", ingress.list_models),
        ("GET", "/v1/models/{model:path}", ingress.get_model),
        ("GET", "/v1/esp/status", ingress.esp_status),
        ("POST", "/tokenize", ingress.tokenize),
        ("POST", "/detokenize", ingress.detokenize),
        ("POST", "/v1/completions", ingress.completions),
        ("POST", "/v1/chat/completions", ingress.chat_completions),
    ]
    for method, path, handler in routes:
        api.add_api_route(path, _endpoint(handler), methods=[method])
    return api


def _endpoint(handler):
    async def endpoint(request: Request) -> Response:
        return await handler(request)

    endpoint.__name__ = handler.__name__
    return endpoint
