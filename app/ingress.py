"""The OpenAI-compatible HTTP ingress (FastAPI under Ray Serve): stateless, autoscaled.

It authenticates, bounds the body size, validates, tokenizes, fans a request out into one
controller stream per choice (`n` choices per prompt, with derived seeds), detokenizes
incrementally, applies stop strings, and answers in OpenAI's shapes (JSON or SSE). It
never imports torch. Every error leaves in OpenAI's envelope (see app/errors.py).
"""

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray.exceptions import RayActorError
from starlette.exceptions import HTTPException as StarletteHTTPException

from esp_core.tokenizer import load_tokenizer
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
from esp_serve.app.openai_models import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from esp_serve.app.protocol import Admission, GenerateRequest, ModelInfo
from esp_serve.app.requests import (
    Limits,
    SubRequest,
    chat_prompt_ids,
    chat_sub_requests,
    check_token_ids,
    completion_sub_requests,
)
from esp_serve.app.telemetry import RequestSpan, Tracing, TracingConfig, carrier_from_headers

GROUP_STOPPED = (
    "the ESP group serving this request stopped (redeploy, scale-down or a "
    "failure) before it finished: retry it"
)

log = logging.getLogger("ray.serve")

_STARTED = int(time.time())


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class _StreamUsage:
    """`stream_options` usage reporting of one streamed response (completions and chat):
    the per-chunk `usage` field and the final usage-only chunk."""

    def __init__(self, opts: Any, head: dict[str, Any], prompt_tokens: int, choices: list[Any]) -> None:
        self.opts, self.head, self.prompt_tokens, self.choices = opts, head, prompt_tokens, choices

    def _now(self) -> dict[str, int]:
        return _usage(self.prompt_tokens, sum(c.num_output_tokens for c in self.choices))

    def field(self) -> dict[str, Any]:
        """What every chunk carries: nothing, `usage: null`, or running usage."""
        if self.opts is None or not self.opts.include_usage:
            return {}
        return {"usage": self._now() if self.opts.continuous_usage_stats else None}

    def final_chunk(self):
        """The callable producing the closing usage chunk, or None when not asked for."""
        if self.opts is None or not self.opts.include_usage:
            return None
        return lambda: {**self.head, "choices": [], "usage": self._now()}


class OpenAIIngress:
    """The deployment class (wrapped with serve.deployment/serve.ingress in app/builder.py)."""

    def __init__(self, config: dict[str, Any], controller: Any) -> None:
        self.cfg = load_config(config)
        self.controller = controller
        self.streams = controller.options(stream=True)
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
        try:
            data = json.loads(body)
        except ValueError as err:
            raise bad_request(f"the body is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise bad_request("the body must be a JSON object")
        try:
            return model_cls.model_validate(data)
        except ValidationError as err:
            raise from_validation_error(err) from None

    def _limits(self, info: ModelInfo, default_max_tokens: int | None) -> Limits:
        return Limits(info, default_max_tokens, self.cfg.server.max_n, self.cfg.server.max_logprobs)

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
        """Start one controller stream per choice; wait for their admissions. Any refusal
        (queue full, context too long) cancels the others and becomes the HTTP error."""
        gens = [
            self.streams.generate.remote(
                GenerateRequest(
                    f"{uuid.uuid4().hex}-{s.index}",
                    s.prompt_ids,
                    s.sampling,
                    trace_context=trace_context or None,
                )
            )
            for s in subs
        ]
        try:
            admissions: list[Admission] = await asyncio.gather(*(g.__anext__() for g in gens))
        except BaseException:
            for g in gens:
                g.cancel()
            raise
        refused = [a for a in admissions if not a.accepted]
        if refused:
            for g in gens:
                g.cancel()
            a = refused[0]
            headers = {"Retry-After": str(a.retry_after_s)} if a.retry_after_s else {}
            kind = "server_error" if a.status >= 500 else "invalid_request_error"
            raise APIError(a.status, a.message, type=kind, code=a.code, headers=headers)
        return gens

    async def _pump(
        self, gen: Any, choice: Choice, out: asyncio.Queue | None, rs: RequestSpan | None = None
    ) -> None:
        """Feed one choice from its stream until it finishes; a stop string ends it early
        and cancels the stream (which aborts the request and frees its KV). A broken
        stream (e.g. the controller died) ends the choice with an error."""
        try:
            async for events in gen:
                for ev in events:
                    if rs is not None and ev.token_id is not None:
                        rs.first_token()  # idempotent: only the first one counts
                    delta = choice.step(ev)
                    if out is not None and (delta.text or choice.done or delta.lp_end > delta.lp_start):
                        out.put_nowait(delta)
                    if choice.done:
                        return
            error = "the stream ended before the request finished"
        except asyncio.CancelledError:
            raise
        except RayActorError:  # the group's replica stopped: say what happened, not how
            error = GROUP_STOPPED
        except Exception as err:  # noqa: BLE001 - reported to the client as a 500
            error = f"{type(err).__name__}: {err}"
        finally:
            gen.cancel()
        if not choice.done:
            choice.finish_reason, choice.error = "error", error
            if out is not None:
                out.put_nowait(choice.delta("", len(choice.logprob_entries)))

    async def _run_all(
        self, gens: list[Any], choices: list[Choice], rs: RequestSpan, prompt_tokens: int
    ) -> None:
        """Run every choice to its end (non-streaming); a failure or the timeout raises.
        Ends the request's span, as `_stream` does for streams."""
        tasks = [asyncio.ensure_future(self._pump(g, c, None, rs)) for g, c in zip(gens, choices)]
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), self.cfg.server.request_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(
                504, "the request timed out (server.request_timeout_s)", type="server_error", code="timeout"
            ) from None
        finally:
            for t in tasks:
                t.cancel()
        failed = [c for c in choices if c.finish_reason == "error"]
        if failed:
            log.error("generation failed: %s", failed[0].error)
            raise internal_error(f"generation failed: {failed[0].error}")
        rs.finish(
            [c.finish_reason or "" for c in choices],
            input_tokens=prompt_tokens,
            output_tokens=sum(c.num_output_tokens for c in choices),
        )

    async def _stream(
        self,
        gens: list[Any],
        choices: list[Choice],
        make_chunks,
        usage_chunk,
        rs: RequestSpan,
        prompt_tokens: int,
    ) -> AsyncIterator[str]:
        """SSE body: chunks as tokens arrive from any choice, then usage and [DONE]. Closing
        it (client disconnect) cancels every choice's stream. Ends the request's span."""
        out: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.ensure_future(self._pump(g, c, out, rs)) for g, c in zip(gens, choices)]
        deadline = time.monotonic() + self.cfg.server.request_timeout_s
        try:
            for chunk in make_chunks(None):  # opening chunks (role, echo)
                yield _sse(chunk)
            while not all(c.done for c in choices) or not out.empty():
                try:
                    delta: Delta = await asyncio.wait_for(out.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    rs.fail("timeout", "the request timed out")
                    yield _sse(
                        APIError(504, "the request timed out", type="server_error", code="timeout").body()
                    )
                    break
                if delta.finish_reason == "error":
                    log.error("generation failed: %s", delta.error)
                    rs.fail("generation_failed", delta.error or "")
                    yield _sse(internal_error(f"generation failed: {delta.error}").body())
                    break
                for chunk in make_chunks(delta):
                    yield _sse(chunk)
            else:
                if usage_chunk is not None:
                    yield _sse(usage_chunk())
                rs.finish(
                    [c.finish_reason or "" for c in choices],
                    input_tokens=prompt_tokens,
                    output_tokens=sum(c.num_output_tokens for c in choices),
                )
            yield "data: [DONE]\n\n"
        finally:
            rs.fail("client_disconnected", "the client closed the stream")  # no-op if ended
            for t in tasks:
                t.cancel()
            for g in gens:
                g.cancel()

    # ------------------------------------------------------------------ routes

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve calls this after the constructor: the routes are closures over self."""
        return build_api(self)

    async def health(self, request: Request) -> Response:
        try:
            await asyncio.wait_for(self.controller.health.remote(), 10)
        except Exception as err:  # noqa: BLE001 - any failure means unhealthy
            return _error_response(
                APIError(503, f"unhealthy: {err!r}", type="server_error", code="unhealthy")
            )
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
            "root": self.cfg.model.path,
            "max_model_len": info.max_model_len,
        }

    async def esp_status(self, request: Request) -> JSONResponse:
        """Per-instance KV slots as the instances report them (tests check the pool is
        fully free after cancellations), plus the scheduler's view and queue sizes."""
        self._auth(request)
        st = await asyncio.wait_for(self.controller.status.remote(), 30)
        return JSONResponse(
            {
                "instances": [
                    {"instance": k.instance, "free_slots": k.free_slots, "total_slots": k.total_slots}
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
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            ids = chat_prompt_ids(req, self.tokenizer)
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
        return JSONResponse({"prompt": self.tokenizer.decode(req.tokens)})

    async def completions(self, request: Request) -> Response:
        req: CompletionRequest = await self._json(request, CompletionRequest)
        info = await self.info()
        rs, carrier, rid = self._start_span(request, "text_completion", info, req, req.max_tokens)
        return await self._traced(rs, self._completions(req, info, rs, carrier, rid))

    async def _completions(
        self, req: CompletionRequest, info: ModelInfo, rs: RequestSpan, carrier: dict[str, str], rid: str
    ) -> Response:
        limits = self._limits(info, self.cfg.server.default_max_tokens_completion)
        subs, prompts = completion_sub_requests(req, self.tokenizer, limits)
        rs.set_input_tokens(sum(len(p) for p in prompts))
        gens = await self._open(subs, carrier)
        choices = [
            Choice(
                s.index,
                self.tokenizer,
                s.prompt_ids,
                req.stop,
                req.skip_special_tokens,
                req.logprobs is not None,
                req.return_tokens_as_token_ids,
            )
            for s in subs
        ]
        echo = [""] * len(prompts)
        if req.echo:
            echo = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in req.prompts()]
        created = int(time.time())
        prompt_tokens = sum(len(p) for p in prompts)
        head = {"id": rid, "object": "text_completion", "created": created, "model": info.served_name}
        subs_by_index = {s.index: s for s in subs}

        if req.stream:
            usage = _StreamUsage(req.stream_options, head, prompt_tokens, choices)

            def chunks(d: Delta | None):
                if d is None:
                    if req.echo:
                        for s in subs:
                            yield {
                                **head,
                                "choices": [
                                    {
                                        "index": s.index,
                                        "text": echo[s.prompt_index],
                                        "logprobs": None,
                                        "finish_reason": None,
                                    }
                                ],
                                **usage.field(),
                            }
                    return
                yield {
                    **head,
                    "choices": [
                        {
                            "index": d.choice.index,
                            "text": d.text,
                            "logprobs": d.choice.completion_logprobs(
                                d.lp_start, d.lp_end, len(echo[subs_by_index[d.choice.index].prompt_index])
                            ),
                            "finish_reason": d.finish_reason,
                        }
                    ],
                    **usage.field(),
                }

            return StreamingResponse(
                self._stream(gens, choices, chunks, usage.final_chunk(), rs, prompt_tokens),
                media_type="text/event-stream",
            )

        await self._run_all(gens, choices, rs, prompt_tokens)
        return JSONResponse(
            {
                **head,
                "choices": [
                    {
                        "index": c.index,
                        "text": echo[subs_by_index[c.index].prompt_index] + c.text,
                        "logprobs": c.completion_logprobs(
                            0, None, len(echo[subs_by_index[c.index].prompt_index])
                        ),
                        "finish_reason": c.finish_reason,
                    }
                    for c in choices
                ],
                "usage": _usage(prompt_tokens, sum(c.num_output_tokens for c in choices)),
            }
        )

    async def chat_completions(self, request: Request) -> Response:
        req: ChatCompletionRequest = await self._json(request, ChatCompletionRequest)
        info = await self.info()
        rs, carrier, rid = self._start_span(request, "chat", info, req, req.requested_max_tokens)
        return await self._traced(rs, self._chat_completions(req, info, rs, carrier, rid))

    async def _chat_completions(
        self, req: ChatCompletionRequest, info: ModelInfo, rs: RequestSpan, carrier: dict[str, str], rid: str
    ) -> Response:
        limits = self._limits(info, self.cfg.server.default_max_tokens_chat)
        subs, prompts = chat_sub_requests(req, self.tokenizer, limits)
        rs.set_input_tokens(sum(len(p) for p in prompts))
        gens = await self._open(subs, carrier)
        choices = [
            Choice(
                s.index,
                self.tokenizer,
                s.prompt_ids,
                req.stop,
                req.skip_special_tokens,
                req.logprobs,
                req.return_tokens_as_token_ids,
            )
            for s in subs
        ]
        created = int(time.time())
        prompt_tokens = sum(len(p) for p in prompts)
        head = {
            "id": rid,
            "object": "chat.completion.chunk" if req.stream else "chat.completion",
            "created": created,
            "model": info.served_name,
        }

        if req.stream:
            usage = _StreamUsage(req.stream_options, head, prompt_tokens, choices)

            def chunks(d: Delta | None):
                if d is None:  # every choice opens with the assistant role
                    for c in choices:
                        yield {
                            **head,
                            "choices": [
                                {
                                    "index": c.index,
                                    "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ],
                            **usage.field(),
                        }
                    return
                yield {
                    **head,
                    "choices": [
                        {
                            "index": d.choice.index,
                            "delta": {"content": d.text} if d.text else {},
                            "logprobs": d.choice.chat_logprobs(d.lp_start, d.lp_end),
                            "finish_reason": d.finish_reason,
                        }
                    ],
                    **usage.field(),
                }

            return StreamingResponse(
                self._stream(gens, choices, chunks, usage.final_chunk(), rs, prompt_tokens),
                media_type="text/event-stream",
            )

        await self._run_all(gens, choices, rs, prompt_tokens)
        return JSONResponse(
            {
                **head,
                "choices": [
                    {
                        "index": c.index,
                        "message": {"role": "assistant", "content": c.text},
                        "logprobs": c.chat_logprobs(),
                        "finish_reason": c.finish_reason,
                    }
                    for c in choices
                ],
                "usage": _usage(prompt_tokens, sum(c.num_output_tokens for c in choices)),
            }
        )


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
        log.error("internal error: %r", err, exc_info=err)
        return _error_response(internal_error(f"Internal server error: {type(err).__name__}"))

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
