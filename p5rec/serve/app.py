"""``p5rec serve --run DIR``: an HTTP JSON API over one loaded run, with concurrent requests decoded together.

    p5rec serve --run runs/<run> --port 8000          # then http://127.0.0.1:8000/docs (OpenAPI), /studio

One endpoint per :class:`~p5rec.serve.inference.P5Rec` task, raw ids in and raw ids out:

| endpoint | P5Rec method | body (JSON object) |
|---|---|---|
| ``POST /recommend`` | ``recommend_batch`` | ``history`` (raw item ids, oldest first), ``user``, ``k``, ``template``, ``exclude_history`` |
| ``POST /rank`` | ``rank_batch`` | ``candidates``, ``user``, ``history`` |
| ``POST /rating`` | ``predict_rating_batch`` | ``user``, ``item`` |
| ``POST /explain`` | ``explain_batch`` | ``user``, ``item``, ``feature``, ``rating`` |
| ``POST /summarize`` | ``summarize_batch`` | ``review``, ``user`` |
| ``POST /review_rating`` | ``rate_review_batch`` | ``review``, ``user`` |

plus ``GET /health`` (liveness and batching statistics) and ``GET /run`` (dataset, fingerprint, families, the run's
test metrics). A body is checked by the same :func:`~p5rec.serve.inference.check_request` as ``p5rec predict --input``
and its ids by :meth:`~p5rec.serve.inference.P5Rec.check_ids` before it is queued; a bad one is answered 400 (not a
JSON object) or 422 (a field: missing, wrong type, bad value, unknown id) with ``{"error": ..., "field": ...}``.

Batching: every checked request goes into one queue. One worker takes the first request waiting, waits at most
``window_ms`` for more (up to ``max_batch``; the wait is skipped while only one request at a time has been in
flight, so a lone client pays no window), and answers them with one :meth:`~p5rec.serve.inference.P5Rec.answer_batch`
call in a thread, so the event loop keeps accepting requests meanwhile; requests that arrive while a batch decodes
form the next one. The model is loaded once and only this worker calls it, so decoding never runs twice at once.
A request the batch call refuses gets its own 422; anything else that goes wrong in a batch is a 500 for that
batch's requests, logged, and the worker goes on.
"""

# No `from __future__ import annotations`: FastAPI reads the annotations of the routes defined inside
# functions (Request, the body models), which string annotations would hide from it.
import asyncio
import json
import logging
import math
import sys
import time
from collections import Counter, deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # a request body larger than this is refused (413) before it is parsed

# endpoint -> (task of check_request / answer_batch, what it does)
ENDPOINTS = {
    "recommend": ("sequential", "Next items for a history (and a user, known or not); catalogue items only."),
    "rank": ("rank", "Order the given candidates, best first (with a history: a sequential candidate template)."),
    "rating": ("rating", "Star rating a known user would give an item."),
    "explain": ("explanation", "Explanation of why a known user would like an item (optionally about a feature)."),
    "summarize": ("review", "Summary (title) of a review."),
    "review_rating": ("review_rating", "Star rating read from a review."),
}


# ---------------------------------------------------------------------------------------------- batching
@dataclass
class _Job:
    request: dict
    future: asyncio.Future
    queued: float


@dataclass
class BatchStats:
    """What the worker did: requests answered, batches decoded, how many requests each batch held."""

    requests: int = 0
    batches: int = 0
    sizes: Counter = field(default_factory=Counter)  # batch size -> number of batches
    tasks: Counter = field(default_factory=Counter)  # task -> requests
    failed_batches: int = 0
    busy_seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"requests": self.requests, "batches": self.batches,
                "mean_batch_size": round(self.requests / self.batches, 2) if self.batches else 0.0,
                "max_batch_size": max(self.sizes, default=0),
                "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())},
                "tasks": dict(self.tasks), "failed_batches": self.failed_batches,
                "busy_seconds": round(self.busy_seconds, 3)}


class Batcher:
    """Collects requests from many coroutines and answers them in batches with one worker.

    ``answer_batch(requests) -> answers`` (one answer or exception per request, in order) runs in a thread, one
    call at a time. ``submit`` returns ``(answer, size of the batch it was decoded in)``.
    """

    def __init__(self, answer_batch: Callable[[list[dict]], list[Any]], max_batch: int = 64,
                 window_ms: float = 5.0):
        if max_batch < 1 or window_ms < 0:
            raise ValueError("max_batch must be at least 1 and window_ms at least 0")
        self.answer_batch, self.max_batch, self.window = answer_batch, max_batch, window_ms / 1000
        self.stats = BatchStats()
        self._in_flight = 0  # submitted requests not answered yet (queued or decoding)
        self._peak = 0  # most in flight at once since the last batch started
        self._pending: deque[_Job] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def start(self) -> None:
        self._arrived = asyncio.Event()
        self._worker = asyncio.create_task(self._run(), name="p5rec-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self._pending.clear()

    async def submit(self, request: dict) -> tuple[Any, int]:
        if self._worker is None or self._worker.done():
            raise RuntimeError("the batch worker is not running")
        job = _Job(request, asyncio.get_running_loop().create_future(), time.perf_counter())
        self._pending.append(job)
        self._in_flight += 1
        self._peak = max(self._peak, self._in_flight)
        self._arrived.set()
        try:
            return await job.future
        finally:
            self._in_flight -= 1

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            # The collection window: wait at most `window` for company, but only while clients are concurrent (more
            # than one request was in flight at once since the last batch started): a lone client, whose next
            # request comes only after this answer, would wait for nobody.
            deadline = loop.time() + (self.window if self._peak > 1 else 0.0)
            self._peak = self._in_flight
            while len(self._pending) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()  # no await between clear and wait: submit() cannot slip in between
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = [self._pending.popleft() for _ in range(min(self.max_batch, len(self._pending)))]
            batch = [job for job in batch if not job.future.done()]  # a client that went away
            if batch:
                await self._answer(batch)

    async def _answer(self, batch: list[_Job]) -> None:
        t0 = time.perf_counter()
        try:
            answers = await asyncio.to_thread(self.answer_batch, [job.request for job in batch])
            if len(answers) != len(batch):
                raise RuntimeError(f"answer_batch returned {len(answers)} answers for {len(batch)} requests")
        except Exception as exc:  # noqa: BLE001 - one failed batch must not stop the worker
            logger.exception("a batch of %d request(s) failed", len(batch))
            self.stats.failed_batches += 1
            answers = [exc] * len(batch)
        self.stats.busy_seconds += time.perf_counter() - t0
        self.stats.requests += len(batch)
        self.stats.batches += 1
        self.stats.sizes[len(batch)] += 1
        for job, answer in zip(batch, answers):
            self.stats.tasks[job.request.get("task", "?")] += 1
            if not job.future.done():
                job.future.set_result((answer, len(batch)))


# ---------------------------------------------------------------------------------------------- run metadata
def run_info(run) -> dict:
    """What ``GET /run`` says about a run: where its data came from and how well it scored.

    ``metrics`` is the per-family summary of the run's ``results.json`` (test split, beside the baselines), or
    None if the run was not evaluated."""
    from p5rec.run import RunError, read_json

    manifest = {}
    if (run.path / "manifest.json").exists():
        try:
            manifest = read_json(run.path / "manifest.json")
        except RunError:
            pass
    results = None
    if (run.path / "results.json").exists():
        try:
            r = read_json(run.path / "results.json")
            results = _finite({"split": r.get("split"), "families": r.get("families"), "baselines": r.get("baselines")})
        except RunError as exc:
            logger.warning("results.json unreadable: %s", exc)
    config = run.config
    return {
        "run": str(run.path),
        "dataset": manifest.get("dataset") or config.get("data", {}).get("dataset"),
        "fingerprint": run.fingerprint,
        "prepared_dir": config.get("prepared_dir"),
        "families": config.get("mixture", {}).get("families") or sorted({t.family for t in run.templates}),
        "trained_templates": sorted(run.trained_templates) if run.trained_templates is not None else None,
        "id_form": run.render_config.id_form,
        "users": len(run.index.users),
        "items": len(run.index.items),
        "model": {"preset": config.get("model", {}).get("preset"), "parameters": config.get("parameters")},
        "p5rec_version": config.get("p5rec_version"),
        "metrics": results,
    }


def _finite(value):
    """``value`` with NaN and infinities as None: JSON has no such numbers (a rating template whose outputs never
    parse has RMSE_valid NaN in results.json), and one of them would turn ``GET /run`` into a 500."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- OpenAPI schemas
def _schemas():
    """Request and answer models, for the OpenAPI page only: bodies are checked by ``check_request`` (the CLI's
    check, with its messages), not by pydantic, which would coerce ``"k": "3"`` where the CLI refuses it."""
    from pydantic import BaseModel, Field

    class Recommend(BaseModel):
        history: list[str] = Field(default=[], description="raw item ids, oldest first")
        user: str | None = Field(None, description="raw user id; unknown users get a history-only prompt")
        user_name: str | None = None
        k: int = Field(10, ge=1, description="items to return")
        template: str | None = Field(None, description="template id (default: a seen template of the family)")
        exclude_history: bool = Field(True, description="never recommend an item of the history")

    class Rank(BaseModel):
        candidates: list[str] = Field(description="raw item ids to order")
        user: str | None = None
        user_name: str | None = None
        history: list[str] | None = Field(None, description="raw item ids, oldest first (optional)")
        template: str | None = None

    class Rating(BaseModel):
        user: str = Field(description="raw user id the run knows")
        item: str = Field(description="raw item id")
        template: str | None = None

    class Explain(Rating):
        feature: str | None = Field(None, description="a feature word the explanation should be about")
        rating: float | None = Field(None, description="star rating, for templates that show it")

    class Review(BaseModel):
        review: str = Field(description="review text")
        user: str | None = None
        template: str | None = None

    class Item(BaseModel):
        item: str
        score: float = Field(description="log-probability")

    class Items(BaseModel):
        items: list[Item]
        batch_size: int = Field(description="requests decoded together with this one")
        latency_ms: float

    class RatingAnswer(BaseModel):
        rating: float | None = Field(description="in [1, 5]; null when the output is not a number")
        text: str
        expected: float | None = Field(None, description="/rating: the expected star under the model's "
                                       "distribution over 1..5 (lower squared error than the greedy answer)")
        calibrated: float | None = Field(None, description="/rating: the expected star on the line fitted to the "
                                         "template's validation cases by the run's test evaluation; null before "
                                         "one")
        expected_mean: float | None = Field(None, description="/rating: the expected star averaged over the "
                                            "rating templates the run's test evaluation averaged (the lowest "
                                            "squared error there); null before one")
        calibrated_mean: float | None = Field(None, description="/rating: that mean on the line fitted to its "
                                              "validation cases; null before a test evaluation")
        batch_size: int
        latency_ms: float

    class Explanation(BaseModel):
        explanation: str
        batch_size: int
        latency_ms: float

    class Summary(BaseModel):
        summary: str
        batch_size: int
        latency_ms: float

    class Error(BaseModel):
        error: str = Field(description="one line naming the field and what is wrong")
        field: str | None = Field(description="the request field at fault, if one is")

    bodies = {"recommend": Recommend, "rank": Rank, "rating": Rating, "explain": Explain, "summarize": Review,
              "review_rating": Review}
    answers = {"recommend": Items, "rank": Items, "rating": RatingAnswer, "explain": Explanation,
               "summarize": Summary, "review_rating": RatingAnswer}
    return bodies, answers, Error


# ---------------------------------------------------------------------------------------------- the app
def _error(status: int, message: str, field_name: str | None = None):
    """``{"error": message, "field": field_name}``; a message that does not name its field yet starts with it."""
    from fastapi.responses import JSONResponse

    if field_name and f"'{field_name}'" not in message:
        message = f"field '{field_name}': {message}"
    return JSONResponse({"error": message, "field": field_name}, status_code=status)


def create_app(rec, info: dict | None = None, *, max_batch: int = 64, window_ms: float = 5.0, max_k: int = 100,
               studio=None):
    """The FastAPI app answering with ``rec`` (a :class:`~p5rec.serve.inference.P5Rec`); ``info`` is ``GET /run``'s
    body; ``studio`` (a :class:`p5rec.serve.studio.Studio`) adds the template studio at ``/studio``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    from p5rec.serve.inference import REFUSED, RequestError, UnknownIdError, _message, check_request

    batcher = Batcher(rec.answer_batch, max_batch=max_batch, window_ms=window_ms)
    started = time.time()

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="p5rec", version=str((info or {}).get("p5rec_version") or ""), lifespan=lifespan,
                  description="P5-style recommendation with one trained run: raw ids in, raw ids out. "
                              "Concurrent requests are decoded together in batches.")
    app.state.batcher = batcher

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):  # 404 for an unknown path, 405 for a wrong method: the same JSON shape
        return _error(exc.status_code, str(exc.detail))

    async def handle(task: str, request: Request):
        t0 = time.perf_counter()
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return _error(413, f"request body of {len(body)} bytes; at most {MAX_BODY_BYTES}")
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            where = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
            return _error(400, f"body is not JSON: {getattr(exc, 'msg', exc)}{where}")
        except RecursionError:
            return _error(400, "body is not JSON: nested too deeply")
        if not isinstance(payload, dict):
            return _error(400, "body must be a JSON object of request fields, like "
                               '{"history": ["B0002E1G5C"], "k": 5}')
        try:
            checked = check_request({**payload, "task": task})
            if checked.get("k", 0) > max_k:
                raise RequestError(f"field 'k' must be at most {max_k} (this server's --max-k), got {checked['k']}",
                                   "k")
            rec.check_ids(checked)
        except (RequestError, UnknownIdError) as exc:
            return _error(422, str(exc), exc.field)
        try:
            answer, size = await batcher.submit(checked)
        except RuntimeError as exc:
            return _error(503, str(exc))
        if isinstance(answer, REFUSED):
            return _error(422, _message(answer), getattr(answer, "field", None))
        if isinstance(answer, Exception):
            return _error(500, f"internal error while decoding ({type(answer).__name__}: {answer}); the server "
                               "goes on answering")
        return JSONResponse({**answer, "batch_size": size, "latency_ms": round((time.perf_counter() - t0) * 1000, 2)})

    bodies, answers, error_model = _schemas()
    for name, (task, summary) in ENDPOINTS.items():
        schema = bodies[name].model_json_schema()

        async def endpoint(request: Request, _task=task):
            return await handle(_task, request)

        app.add_api_route(
            f"/{name}", endpoint, methods=["POST"], summary=summary, name=name, tags=["tasks"],
            response_model=None,
            responses={200: {"model": answers[name]}, 400: {"model": error_model}, 422: {"model": error_model}},
            openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}},
        )

    @app.get("/health", tags=["server"], summary="Liveness, uptime and batching statistics.")
    async def health():
        return {"status": "ok", "uptime_s": round(time.time() - started, 1), "max_batch": batcher.max_batch,
                "window_ms": batcher.window * 1000, "queued": len(batcher._pending), "in_flight": batcher._in_flight,
                "batching": batcher.stats.as_dict()}

    @app.get("/run", tags=["server"], summary="The run: dataset, fingerprint, families, test metrics.")
    async def run_metadata():
        return info or {}

    @app.get("/", include_in_schema=False)
    async def index():
        return {"p5rec": "serve", "endpoints": [f"POST /{n}" for n in ENDPOINTS] + ["GET /health", "GET /run"],
                "docs": "/docs", "studio": "/studio" if studio is not None else None}

    if studio is not None:
        from fastapi.exceptions import RequestValidationError

        from p5rec.serve.studio import validation_error_handler

        app.add_exception_handler(RequestValidationError, validation_error_handler)
        app.include_router(studio.router(), prefix="/studio")
    return app


# ---------------------------------------------------------------------------------------------- CLI
def add_cli(subparsers) -> None:
    from p5rec.argtypes import float_at_least, int_at_least, port

    p = subparsers.add_parser("serve", help="HTTP JSON API over a trained run (batched), with the template studio")
    p.add_argument("--run", required=True, type=Path, help="run directory written by train.py")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port, default=8000, help="port (0: any free port; default 8000)")
    p.add_argument("--max-batch", type=int_at_least(1), default=64, help="most requests decoded in one batch")
    p.add_argument("--window-ms", type=float_at_least(0), default=5.0,
                   help="how long a request waits for others to batch with, when clients are concurrent (default 5 ms)")
    p.add_argument("--max-k", type=int_at_least(1), default=100, help="largest k a request may ask for")
    p.add_argument("--threads", type=int_at_least(1), help="torch threads (default: torch's, or OMP_NUM_THREADS)")
    p.add_argument("--dataset", type=Path, help="prepared dataset for the studio's records (default: the run's)")
    p.add_argument("--save-dir", type=Path, default=Path("."),
                   help="directory the studio saves template files into (default: the current directory)")
    p.add_argument("--no-studio", action="store_true", help="do not serve the template studio at /studio")
    p.set_defaults(func=_cli)


def _fail(message: str) -> int:
    print(f"p5rec serve: {message}", file=sys.stderr)
    return 2


def _cli(args) -> int:
    from p5rec.serve.httpserver import is_loopback, listen, run_server
    from p5rec.serve.inference import P5Rec
    from p5rec.run import Run, RunError

    if not args.no_studio and not args.save_dir.is_dir():
        return _fail(f"--save-dir {args.save_dir}: no such directory")
    try:  # the port first: a busy one is refused before the model is loaded
        sock = listen(args.host, args.port)
    except OSError as exc:
        return _fail(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc})")
    try:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        try:
            run = Run.open(args.run)
        except RunError as exc:
            return _fail(str(exc))
        studio = None
        if not args.no_studio:
            from p5rec.serve.studio import Studio, StudioError

            try:
                studio = Studio.for_run(run, dataset=args.dataset, save_dir=args.save_dir)
            except StudioError as exc:
                return _fail(str(exc))
        app = create_app(P5Rec.from_run(run), run_info(run), max_batch=args.max_batch, window_ms=args.window_ms,
                         max_k=args.max_k, studio=studio)
        host, port = sock.getsockname()[:2]
        logger.info("serving %s on http://%s:%d (OpenAPI page /docs%s)", args.run, host, port,
                    "" if studio is None else ", template studio /studio")
        if studio is not None and not is_loopback(args.host):
            logger.warning("the studio saves files into %s for anyone who reaches %s:%d; --no-studio turns it off",
                           studio.save_dir.resolve(), host, port)
        run_server(app, sock)
    finally:
        sock.close()
    return 0
