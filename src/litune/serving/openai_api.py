"""An OpenAI-compatible HTTP API for a litune model, on LitServe.

LitServe runs the parts a model server needs: HTTP processes (FastAPI/uvicorn) that hand requests over a queue to an
inference worker process, which collects concurrent requests into batches (``BatchedStreamingLoop``: up to
``max_batch_size`` requests that arrive within ``batch_timeout``) and streams each row's output back.

LitServe's own ``OpenAISpec`` is not used, because it cannot do what this API must (checked on litserve 0.2.19):
it serves only ``/v1/chat/completions`` (no ``/v1/completions``, no ``/v1/models``); its request model has no ``seed``
field (a seed would be dropped silently); it always answers ``finish_reason="stop"``, even when ``max_tokens`` cut the
reply; and it checks requests in the inference worker, where one bad request in a batch fails every request of the
batch, and a bad streaming request still gets HTTP 200 with an error event. :class:`OpenAICompatibleSpec` is a
``LitSpec`` of its own instead: it parses and checks each request in the HTTP process (a 4xx JSON error in OpenAI's
``{"error": {...}}`` shape, before anything is queued, so a bad request never reaches the model), renders chats with
the tokenizer's template, tokenizes, puts one work item per choice (``n``) on LitServe's queue, and formats the
streamed rows as OpenAI chat/completion responses or server-sent events. :class:`GenerationAPI` is the ``LitAPI`` of
the worker: it decodes a batch with :func:`litune.serving.engine.stream`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import asdict
from importlib import resources
from typing import Any, Literal

import litserve as ls
from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from litserve.loops.streaming_loops import BatchedStreamingLoop
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from litune.serving import engine

MAX_N = 16
"""Most choices one request may ask for (OpenAI allows 128; each choice is a batch row here)."""


class APIError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error body (message, type, param, code)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "not_found_error" if self.status == 404 else "invalid_request_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class _Common(BaseModel):
    """Fields shared by both endpoints; unknown fields are ignored, as OpenAI-compatible servers commonly do."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[_TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


class CompletionRequest(_Common):
    prompt: str | list[str]
    max_tokens: int | None = 16  # OpenAI's default for /v1/completions


class OpenAICompatibleSpec(LitSpec):
    """``/v1/chat/completions``, ``/v1/completions``, ``/v1/models`` and the chat page ``/`` (see the module text).

    Args:
        model_id: the name clients must give as ``model`` (``/v1/models`` lists it).
        tokenizer: the model's tokenizer (chat template, token counts for the context check).
        context: the model's context length in tokens (prompt and reply together); None: unchecked.
    """

    def __init__(self, model_id: str, tokenizer: Any, context: int | None) -> None:
        super().__init__()
        self.api_path = "/v1/chat/completions"  # LitServe keys the request queue by this path
        self.model_id, self.tokenizer, self.context = model_id, tokenizer, context
        self.created = int(time.time())
        self.add_endpoint("/v1/chat/completions", self.chat_completions, ["POST"])
        self.add_endpoint("/v1/completions", self.completions, ["POST"])
        self.add_endpoint("/v1/models", self.models, ["GET"])
        self.add_endpoint("/", self.page, ["GET"])

    @property
    def stream(self) -> bool:
        return True  # LitServe picks its streaming loop and transport

    def decode_request(self, request: Any, context_kwargs: dict | None = None) -> Any:
        return request

    def encode_response(self, output: Any, context_kwargs: dict | None = None) -> Any:
        return output

    # --- endpoints (run in the HTTP processes) ---

    async def page(self) -> HTMLResponse:
        return HTMLResponse(resources.files("litune.serving").joinpath("chat.html").read_text(encoding="utf-8"))

    async def models(self) -> JSONResponse:
        card = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "litune"}
        return JSONResponse({"object": "list", "data": [card]})

    async def chat_completions(self, request: Request) -> Any:
        try:
            body = await self._parse(request, ChatRequest)
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            prompt = engine.encode_prompt(self.tokenizer, engine.render_chat(self.tokenizer, messages), chat=True)
            limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            items = self._work(body, [prompt], limit, "max_completion_tokens" if body.max_completion_tokens else None)
        except APIError as err:
            return err.response()
        return await self._respond(body, items, chat=True)

    async def completions(self, request: Request) -> Any:
        try:
            body = await self._parse(request, CompletionRequest)
            texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            if not texts:
                raise APIError(400, "prompt is an empty list", "prompt")
            prompts = [engine.encode_prompt(self.tokenizer, t) for t in texts]
            items = self._work(body, prompts, body.max_tokens)
        except APIError as err:
            return err.response()
        return await self._respond(body, items, chat=False)

    # --- checks ---

    async def _parse(self, request: Request, schema: type[_Common]) -> Any:
        """The request body as ``schema``, or an :class:`APIError` (400 malformed JSON or fields, 404 unknown model)."""
        try:
            data = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON ({err})", None, "invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
        try:
            body = schema.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise APIError(400, f"{field}: {first['msg']}", field, "invalid_value") from None
        if body.model not in (None, "", self.model_id):
            raise APIError(
                404, f"the model '{body.model}' does not exist; this server serves '{self.model_id}'", "model",
                "model_not_found",
            )  # fmt: skip
        return body

    def _work(
        self, body: _Common, prompts: list[list[int]], max_tokens: int | None, limit_name: str | None = None
    ) -> list[tuple[int, dict]]:
        """One work item per prompt and choice: ``(prompt index, {"prompt": ids, "sampling": Sampling})``.

        A request without ``max_tokens`` (chat) may fill the context; an explicit one must fit beside the prompt, as
        the OpenAI API requires.
        """
        name = limit_name or "max_tokens"
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"{name}={max_tokens} must be at least 1", name, "invalid_value")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop takes up to 4 non-empty strings", "stop", "invalid_value")
        items = []
        for index, prompt in enumerate(prompts):
            room = None if self.context is None else self.context - len(prompt)
            if room is not None and room < 1:
                raise APIError(
                    400, f"the prompt has {len(prompt)} tokens but the model's context is {self.context} tokens; "
                    "shorten the prompt or the conversation", "messages" if limit_name is not None else "prompt",
                    "context_length_exceeded",
                )  # fmt: skip
            if max_tokens is not None and room is not None and max_tokens > room:
                raise APIError(
                    400, f"the prompt has {len(prompt)} tokens and {name}={max_tokens}, together more than the "
                    f"model's context of {self.context} tokens; ask for at most {room} tokens", name,
                    "context_length_exceeded",
                )  # fmt: skip
            limit = max_tokens if max_tokens is not None else room or 256
            for choice in range(body.n):
                seed = None if body.seed is None else body.seed + choice  # choices differ, and each reproduces
                sampling = engine.Sampling(limit, body.temperature, body.top_p, seed, tuple(stop))
                items.append((index, {"prompt": prompt, "sampling": sampling}))
        return items

    # --- responses ---

    def _submit(self, item: dict) -> tuple[uuid.UUID, AsyncIterator[tuple[Any, LitAPIStatus]]]:
        """Queue one work item for the inference worker; its rows come back through LitServe's response buffer."""
        uid = uuid.uuid4()
        queue: deque = deque()
        event = asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(response_queue=queue, event=event)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), item))
        return uid, self.data_streamer(queue, event, send_status=True)

    async def _deltas(self, item: dict) -> AsyncIterator[dict]:
        """The deltas of one choice as dicts (:class:`litune.serving.engine.Delta`)."""
        uid, rows = self._submit(item)
        try:
            async for data, status in rows:
                if status == LitAPIStatus.ERROR:
                    raise RuntimeError(f"generation failed: {data}")
                if data:
                    yield json.loads(data)
        finally:
            self.response_buffer.pop(uid, None)

    async def _respond(self, body: _Common, items: list[tuple[int, dict]], chat: bool) -> Any:
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time())}
        head["model"] = self.model_id
        if body.stream:
            events = self._events(head, items, chat)
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            results = await asyncio.gather(*(self._collect(item) for _, item in items))
        except RuntimeError as err:
            return JSONResponse({"error": {"message": str(err), "type": "server_error"}}, status_code=500)
        choices = []
        for i, (text, finish) in enumerate(results):
            reply = {"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None}
            choices.append({"index": i, **reply, "finish_reason": finish["finish_reason"]})
        prompt_tokens = sum(len(item["prompt"]) for k, (_, item) in enumerate(items) if k % body.n == 0)
        completion_tokens = sum(f["completion_tokens"] for _, f in results)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        usage["total_tokens"] = prompt_tokens + completion_tokens
        return JSONResponse({**head, "choices": choices, "usage": usage})

    async def _collect(self, item: dict) -> tuple[str, dict]:
        parts, last = [], {}
        async for delta in self._deltas(item):
            parts.append(delta["text"])
            last = delta
        return "".join(parts), last

    async def _events(self, head: dict, items: list[tuple[int, dict]], chat: bool) -> AsyncIterator[str]:
        """Server-sent events: one chunk per piece of text of any choice, a last chunk per choice with its
        ``finish_reason``, then ``[DONE]``."""
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, item: dict) -> None:
            try:
                async for delta in self._deltas(item):
                    await merged.put((index, delta))
            except RuntimeError as err:
                await merged.put((index, err))
            await merged.put((index, None))

        tasks = [asyncio.create_task(pump(i, item)) for i, (_, item) in enumerate(items)]
        if chat:
            for i in range(len(items)):
                chunk = {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                yield _sse({**head, "choices": [chunk]})
        open_choices = len(items)
        try:
            while open_choices:
                index, delta = await merged.get()
                if delta is None:
                    open_choices -= 1
                    continue
                if isinstance(delta, Exception):
                    yield _sse({"error": {"message": str(delta), "type": "server_error"}})
                    return
                if not delta["text"] and delta["finish_reason"] is None:
                    continue
                piece = {"delta": {"content": delta["text"]}} if chat else {"text": delta["text"], "logprobs": None}
                yield _sse({**head, "choices": [{"index": index, **piece, "finish_reason": delta["finish_reason"]}]})
            yield "data: [DONE]\n\n"
        finally:
            for task in tasks:
                task.cancel()


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class GenerationAPI(ls.LitAPI):
    """The inference worker: decodes each batch of work items with :func:`litune.serving.engine.stream`.

    Args:
        checkpoint: what ``litune serve --checkpoint`` names; the worker process loads it in :meth:`setup`, on its
            device (handing it over from the main process would pickle every weight through shared memory, which
            containers often limit to 64 MiB).
        spec: the :class:`OpenAICompatibleSpec` that fills the queue.
        max_batch_size: most requests (choices) decoded together.
        batch_timeout: seconds the worker waits for more requests before it starts a batch.
    """

    def __init__(self, checkpoint: str, spec: OpenAICompatibleSpec, max_batch_size: int, batch_timeout: float) -> None:
        # BatchedStreamingLoop also for max_batch_size=1 (LitServe's default there expects a request, not a list).
        super().__init__(
            max_batch_size=max_batch_size, batch_timeout=batch_timeout, spec=spec, loop=BatchedStreamingLoop()
        )
        self.checkpoint = checkpoint

    def setup(self, device: str) -> None:
        import signal

        # Ctrl-C reaches the whole process group; the main process stops this worker itself (SIGTERM), so the
        # worker ignores SIGINT instead of dying mid-batch with a KeyboardInterrupt traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.network, self.tokenizer = engine.load_model(self.checkpoint, device)
        self.stop_ids = engine.stop_token_ids(self.tokenizer, self.network)

    def decode_request(self, request: dict) -> dict:
        return request

    def predict(self, items: list[dict]) -> Any:
        prompts = [item["prompt"] for item in items]
        settings = [item["sampling"] for item in items]
        for step in engine.stream(self.network, self.tokenizer, prompts, settings, self.stop_ids):
            yield [None if delta is None else asdict(delta) for delta in step]

    def unbatch(self, output: Any) -> Any:
        return output  # predict already yields one list entry per request

    def encode_response(self, output: Any) -> Any:
        yield from output


def build_server(
    checkpoint: str,
    device: str = "cpu",
    max_batch_size: int = 8,
    batch_timeout: float = 0.02,
    model_id: str | None = None,
) -> ls.LitServer:
    """Wire the LitServer. The model is loaded here once on the CPU, so that a bad checkpoint fails before any process
    starts and the HTTP side knows the tokenizer and the context length; the inference worker loads its own copy."""
    from pathlib import Path

    network, tokenizer = engine.load_model(checkpoint, "cpu")
    context = engine.context_length(network)
    del network
    spec = OpenAICompatibleSpec(model_id or Path(checkpoint.rstrip("/")).name, tokenizer, context)
    api = GenerationAPI(checkpoint, spec, max_batch_size, batch_timeout)
    accelerator = "cuda" if device.startswith("cuda") else "cpu"
    devices: Any = [int(device.split(":")[1])] if ":" in device else 1
    server = ls.LitServer(api, accelerator=accelerator, devices=devices, timeout=False)
    # LitServe answers GET / with "litserve running"; the chat page takes that path (first matching route wins).
    server.app.router.routes = [
        r for r in server.app.router.routes if not (getattr(r, "path", None) == "/" and r.endpoint != spec.page)
    ]
    return server
