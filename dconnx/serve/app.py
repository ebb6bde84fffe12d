"""The HTTP server: FastAPI routes over one Explainer and a MicroBatcher, run by uvicorn.

Routes: POST /predict, POST /explain, GET /model, GET /healthz, GET /metrics.
Every error is JSON {"error": message, "type": kind} with a 4xx/5xx status.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import DconnxError, InputError
from ..runtime import Explainer
from . import codec
from .codec import Malformed, TooLarge
from .batching import MicroBatcher, QueueFull, ServerClosing
from .config import ServeConfig
from .metrics import Metrics

log = logging.getLogger("dconnx.serve")
ROUTES = ("/predict", "/explain", "/model", "/healthz", "/metrics")
IMAGE_TYPES = ("image/", "application/octet-stream")
LOOP_PARSE_BYTES = 1 << 20


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    """The body did not arrive within --body-timeout: 408."""


class UnsupportedMedia(InputError):
    """A Content-Type the server does not read: 415."""


def error_response(status: int, message: str, kind: str, headers=None) -> JSONResponse:
    return JSONResponse({"error": message, "type": kind}, status_code=status, headers=headers)


class Guard:
    """Pure ASGI middleware: request id, body size limit, metrics and one JSON log line per request."""

    def __init__(self, app, config: ServeConfig, metrics: Metrics):
        self.app, self.config, self.metrics = app, config, metrics
        self.in_flight = 0      # requests past their headers (--max-connections bounds them)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope.get("path", "")
        route = path if path in ROUTES else "other"
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex[:16]
        status = 500
        limit = self.config.max_body_bytes

        async def send_tagged(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = dict(message, headers=list(message.get("headers", [])) +
                               [(b"x-request-id", rid.encode("latin-1"))])
            await send(message)

        received = 0
        body_done = False
        deadline = None
        body_timeout = self.config.body_timeout_s

        async def limited_receive():
            nonlocal received, body_done, deadline
            if body_done:
                return await receive()
            if deadline is None:         # the clock starts when the app first reads the body
                deadline = time.monotonic() + body_timeout
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                raise BodyTimeout(f"the body did not arrive within {body_timeout} s "
                                  "(dconnx serve --body-timeout)") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(f"the body exceeds {limit} bytes")
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        limit_flight = self.config.max_connections
        self.in_flight += 1
        try:
            declared = headers.get(b"content-length")
            if limit_flight and self.in_flight > limit_flight and path not in ("/healthz", "/metrics"):
                resp = error_response(503, f"more than {limit_flight} requests in flight "
                                      "(dconnx serve --max-connections)", "ServerBusy", {"Retry-After": "1"})
                await resp(scope, receive, send_tagged)
            elif declared is not None and declared.isdigit() and int(declared) > limit:
                # read what was sent (up to a bound) so the client sees the 413, not a reset connection
                await _drain(receive, max(4 * limit, 64 << 20))
                resp = error_response(413, f"the body has {int(declared)} bytes; at most {limit} are "
                                      "accepted (dconnx serve --max-body-bytes)", "BodyTooLarge")
                await resp(scope, receive, send_tagged)
            else:
                await self.app(scope, limited_receive, send_tagged)
        finally:
            self.in_flight -= 1
            seconds = time.perf_counter() - t0
            self.metrics.observe_request(route, status, seconds)
            client = scope.get("client") or ("", 0)
            log.info("request", extra={"fields": {
                "request_id": rid, "method": scope.get("method"), "path": path, "status": status,
                "ms": round(seconds * 1000, 2), "bytes_in": received or int(headers.get(b"content-length", b"0")
                                                                           or 0),
                "client": f"{client[0]}:{client[1]}"}})


async def _drain(receive, cap: int) -> None:
    seen = 0
    while seen <= cap:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class Service:
    """The model side of the server: parse requests, batch them, build responses."""

    def __init__(self, ex: Explainer, config: ServeConfig, metrics: Metrics, name: str):
        self.ex, self.config, self.metrics, self.name = ex, config, metrics, name
        self.explained = ex.meta.get("dconnx.explained")
        if self.explained not in ex.output_names:
            self.explained = ex.output_names[0]
        internal = {"g", "h", *ex.methods}
        self.model_outputs = [o for o in ex.output_names if o not in internal]
        try:
            from ..images import ImageInput
            self.images = ImageInput.from_explainer(ex)
        except InputError:
            self.images = None     # not an image model: tensors only
        shape = ex.input_shape[1:]
        elements = math.prod(d if isinstance(d, int) and d > 0 else 1 for d in shape)
        if self.images is not None:
            elements = max(elements, self.images.height * self.images.width * self.images.channels)
        # a dense output [batch, classes, *spatial] is explained over a region of its positions
        shape = getattr(ex, "region_shape", None) if ex.accepts_region else None
        self.region_shape = list(shape) if shape else None
        region_elements = (math.prod(d if isinstance(d, int) and d > 0 else 1 for d in self.region_shape)
                           if self.region_shape else 0)
        self.limits = codec.Limits(int(elements), config.max_request_samples, int(region_elements))
        self.decoding = asyncio.Semaphore(config.max_decoding)
        self.batcher = MicroBatcher(self._run, max_batch=config.max_batch,
                                    max_delay_s=config.max_delay_ms / 1000.0, max_queue=config.max_queue,
                                    observe=metrics.observe_batch)

    @property
    def dense(self) -> bool:
        return self.region_shape is not None

    def _run(self, x, target, alpha, region=None) -> dict:
        return self.ex(x, target=target, alpha=alpha, region=region)

    def scores(self, req: codec.Request, out: dict) -> np.ndarray:
        """What the classes are ranked by, [n, classes]: the logits, or for a dense output its
        logits summed over the request's region (every position when none was given), as
        Explainer.maps computes them."""
        logits = np.asarray(out[self.explained])
        if not (self.dense and logits.ndim > 2):
            return logits.reshape(req.n, -1)
        axes = tuple(range(2, logits.ndim))
        if req.region is None:
            return logits.astype(np.float64).sum(axes)
        return (logits.astype(np.float64) * req.region.mask.astype(np.float64)[:, None]).sum(axes)

    def describe(self) -> dict:
        ex = self.ex
        return {"model": self.name, "provider": ex.provider, "input": ex.input_name,
                "input_shape": ex.input_shape, "outputs": ex.output_names, "methods": ex.methods,
                "n_classes": ex.n_classes, "explained": self.explained,
                "region": None if not self.dense else {
                    "shape": self.region_shape,
                    "box": "x0,y0,x1,y1 in model-input pixels (columns x0..x1-1, rows y0..y1-1)",
                    "mask": f"[{', '.join(map(str, self.region_shape))}] or [n, ...]: the class is "
                            "summed over the mask's weights"},
                "alpha_default": ex.options.get("alpha_default"),
                "image_input": None if self.images is None else {
                    "height": self.images.height, "width": self.images.width,
                    "channels": self.images.channels, "mean": self.images.mean, "std": self.images.std},
                "limits": {"max_batch": self.config.max_batch,
                           "max_request_samples": self.config.max_request_samples,
                           "max_body_bytes": self.config.max_body_bytes, "timeout_s": self.config.timeout_s,
                           "max_json_values": self.limits.max_values,
                           "max_image_bytes": self.limits.max_image_bytes,
                           "max_decoding": self.config.max_decoding,
                           "header_timeout_s": self.config.header_timeout_s,
                           "body_timeout_s": self.config.body_timeout_s}}

    async def parse(self, request: Request, route: str) -> codec.Request:
        """At most --max-decoding requests read and decode their bodies at once: the memory of
        decoding is bounded by that many times one request's limits. The body itself is read
        first (at most --max-body-bytes, within --body-timeout), so a slow client holds no slot."""
        await request.body()
        async with self.decoding:
            try:
                return await self._parse(request, route)
            except StarletteHTTPException as e:   # multipart parse errors, too many files or fields
                if e.status_code >= 500:
                    raise
                raise Malformed(f"cannot read the multipart body: {e.detail}") from None

    async def _parse(self, request: Request, route: str) -> codec.Request:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        opts = dict(request.query_params)
        images: list[bytes] = []
        x = None
        if ctype == "application/json":
            raw_body = await request.body()
            body = (self._json(raw_body) if len(raw_body) < LOOP_PARSE_BYTES   # big ones off the loop
                    else await run_in_threadpool(self._json, raw_body))
            opts.update({k: v for k, v in body.items() if k not in ("inputs", "images")})
            if ("inputs" in body) == ("images" in body):
                raise InputError("give exactly one of 'inputs' (an array) and 'images' (base64 image files)")
            if "inputs" in body:
                x = codec.decode_array(body["inputs"])
            else:
                raw = body["images"] if isinstance(body["images"], list) else [body["images"]]
                images = [_b64_image(s, i) for i, s in enumerate(raw)]
        elif ctype == "multipart/form-data":
            form = await request.form(max_files=self.config.max_request_samples,
                                      max_part_size=self.config.max_body_bytes)
            for key, value in form.multi_items():
                if isinstance(value, str):
                    opts[key] = value
                else:
                    images.append(await value.read())
            if not images:
                raise InputError("the multipart body has no file part (send images as 'image' files)")
        elif ctype.startswith(IMAGE_TYPES):
            images = [await request.body()]
        else:
            raise UnsupportedMedia(f"unsupported Content-Type '{ctype or 'none'}'; send application/json, "
                                   "multipart/form-data or an image/* body")
        pictures = []
        if x is None and not images:
            raise InputError("no inputs given (an empty list of images)")
        if images:
            if self.images is None:
                raise InputError("this model does not take images; send 'inputs' as an array")
            if len(images) > self.config.max_request_samples:
                raise InputError(f"{len(images)} images in one request; at most "
                                 f"{self.config.max_request_samples} are accepted")
            loaded = await run_in_threadpool(self._load_images, images)
            x = np.stack([a for a, _ in loaded])
            pictures = [p for _, p in loaded]
        x = codec.check_samples(self.ex, x, self.config.max_request_samples)
        target, alpha, methods, fmt = codec.parse_options(self.ex, opts, x.shape[0], route)
        if route == "explain" and fmt != "array" and self.images is None:
            raise InputError("overlays (format png/both) need an image model")
        input_hw = None if self.images is None else (self.images.height, self.images.width)
        region = codec.parse_region(self.ex, opts.get("region"), x.shape[0], input_hw, self.limits)
        return codec.Request(x, target, alpha, methods, fmt, pictures, region)

    def _json(self, raw: bytes) -> dict:
        codec.json_guard(raw, self.limits)      # size, depth and token length, before parsing
        return codec.parse_json_body(raw)

    def _image_guard(self, i: int, data: bytes) -> None:
        """The image's size from its header, before decoding: its decoded bytes must stay under
        the request limit (IMAGE_FACTOR times one input's float32 bytes, at least 48 MiB)."""
        from PIL import Image
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                bands = len(im.getbands())
                depth = 2 if im.mode in ("I;16", "I;16B", "I;16L") else 4 if im.mode in ("I", "F") else 1
        except Image.DecompressionBombError as e:
            raise TooLarge(f"image {i}: {e}") from None
        except Exception as e:   # noqa: BLE001 - any header Pillow cannot read is the client's
            raise Malformed(f"image {i}: {len(data)} bytes that are not an image file Pillow can read "
                            f"({type(e).__name__})") from None
        need = w * h * max(bands, 3) * depth
        if need > self.limits.max_image_bytes:
            raise TooLarge(f"image {i} is {w}x{h} pixels ({need} bytes decoded); at most "
                           f"{self.limits.max_image_bytes} bytes are accepted for this model's "
                           f"{self.images.height}x{self.images.width} input")

    def _load_images(self, images: list[bytes]):
        out = []
        for i, data in enumerate(images):
            self._image_guard(i, data)
            try:
                out.append(self.images.load(data))
            except InputError as e:
                raise Malformed(f"image {i}: {e}") from None
            except Exception as e:   # noqa: BLE001 - a file Pillow fails on after its header
                if isinstance(e, MemoryError):
                    raise
                raise Malformed(f"image {i}: cannot decode ({type(e).__name__}: {str(e)[:200]})") from None
        return out

    async def run(self, req: codec.Request) -> dict:
        return await self.batcher.submit(req.x, req.target, req.alpha, timeout=self.config.timeout_s,
                                         region=None if req.region is None else req.region.mask)

    def region_info(self, req: codec.Request) -> dict:
        if req.region is not None:
            return req.region.describe()
        return {"kind": "all", "box": None, "positions": [math.prod(self.region_shape)] * req.n
                if all(isinstance(d, int) for d in self.region_shape) else None}

    def predict_response(self, req: codec.Request, out: dict) -> dict:
        scores = self.scores(req, out)
        res = {"model": self.name, "n": req.n,
               "outputs": {k: out[k].tolist() for k in self.model_outputs},
               "argmax": scores.argmax(-1).tolist()}
        if self.dense:      # the classes' region sums, which argmax ranks
            res.update(scores=scores.tolist(), region=self.region_info(req))
        return res

    def explain_response(self, req: codec.Request, out: dict) -> dict:
        scores = self.scores(req, out)
        target = scores.argmax(-1) if req.target is None else np.where(req.target < 0, scores.argmax(-1),
                                                                       req.target)
        alpha = req.alpha if req.alpha is not None else self.ex.options.get("alpha_default")
        res = {"model": self.name, "n": req.n, "target": target.tolist(), "alpha": alpha}
        if self.dense:      # the explained scalar: the class summed over the region
            res.update(scores=scores.tolist(), region=self.region_info(req))
        else:
            res["logits"] = scores.tolist()
        if "g" in out and "h" in out:     # the DC streams of the explained class: f = g - h
            rows = np.arange(req.n)
            res.update({k: np.asarray(out[k]).reshape(req.n, -1)[rows, target].tolist() for k in ("g", "h")},
                       f=scores[rows, target].tolist())
        if req.format in ("array", "both"):
            res["maps"] = {m: codec.encode_array(out[m]) for m in req.methods}
        if req.format in ("png", "both"):
            pictures = req.pictures or [self.images.picture(x) for x in req.x]
            res["overlays"] = {m: [codec.png_b64(_overlay(p, a, m)) for p, a in zip(pictures, out[m])]
                               for m in req.methods}
        return res


def _b64_image(s, i: int) -> bytes:
    import base64
    import binascii
    if not isinstance(s, str):
        raise Malformed(f"images[{i}] must be a base64 string of an image file")
    try:
        return base64.b64decode(s.split(",", 1)[1] if s.startswith("data:") else s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise Malformed(f"images[{i}] is not valid base64: {e}") from None


def _overlay(picture: np.ndarray, heat: np.ndarray, method: str) -> np.ndarray:
    """The map over its picture, coloured by the method's own colormap (as `dconnx explain`)."""
    from ..viz import MapStyle, overlay
    if heat.shape != picture.shape[:2]:    # maps kept at the layer's resolution (--no-upsample)
        from PIL import Image
        heat = np.asarray(Image.fromarray(heat.astype(np.float32)).resize(
            (picture.shape[1], picture.shape[0]), Image.BILINEAR))
    return overlay(picture, heat, style=MapStyle.of(method, heat, warn=False))


def _status(e: Exception) -> tuple[int, str]:
    if isinstance(e, TooLarge):
        return 413, "TooLarge"
    if isinstance(e, Malformed):
        return 400, "MalformedRequest"
    if isinstance(e, BodyTimeout):
        return 408, "BodyTimeout"
    if isinstance(e, UnsupportedMedia):
        return 415, "UnsupportedMediaType"
    if isinstance(e, DconnxError):
        return 422, type(e).__name__
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return 504, "Timeout"
    if isinstance(e, (QueueFull, ServerClosing)):
        return 503, type(e).__name__
    if isinstance(e, BodyTooLarge):
        return 413, "BodyTooLarge"
    return 500, "InternalError"


def create_app(model, config: ServeConfig) -> FastAPI:
    config.validate()
    if isinstance(model, Explainer):
        ex, name = model, "model"
    else:
        ex = Explainer(model, providers=list(config.providers) if config.providers else None,
                       threads=config.threads)
        name = Path(str(model)).name.removesuffix(".onnx").removesuffix(".dc")
    metrics = Metrics()
    service = Service(ex, config, metrics, name)

    @asynccontextmanager
    async def lifespan(app):
        await service.batcher.start()
        log.info("ready", extra={"fields": {"model": name, "provider": ex.provider, "methods": ex.methods,
                                            "max_batch": config.max_batch,
                                            "max_delay_ms": config.max_delay_ms}})
        yield
        await service.batcher.stop()

    app = FastAPI(title="dconnx", description="Predictions and DC attribution maps of one converted model",
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service

    async def handle(request: Request, route: str) -> JSONResponse:
        try:
            req = await service.parse(request, route)
            out = await service.run(req)
            body = (service.explain_response(req, out) if route == "explain"
                    else service.predict_response(req, out))
            return JSONResponse(body)
        except asyncio.TimeoutError:
            return error_response(504, f"the request took longer than {config.timeout_s} s "
                                  "(dconnx serve --timeout)", "Timeout")
        except Exception as e:   # noqa: BLE001 - every failure becomes a JSON error
            status, kind = _status(e)
            if status >= 500 and kind == "InternalError":
                log.exception("internal error")
                return error_response(500, f"internal error: {type(e).__name__}: {e}", kind)
            headers = {"Retry-After": "1"} if status == 503 else {"Connection": "close"} if status == 408 else None
            return error_response(status, str(e), kind, headers)

    @app.post("/predict")
    async def predict(request: Request):
        return await handle(request, "predict")

    @app.post("/explain")
    async def explain(request: Request):
        return await handle(request, "explain")

    @app.get("/model")
    async def model_info():
        return service.describe()

    @app.get("/healthz")
    async def healthz():
        task = service.batcher._task
        ok = task is not None and not task.done()
        return JSONResponse({"status": "ok" if ok else "down", "model": name, "provider": ex.provider,
                             "queue_depth": service.batcher.depth}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        metrics.queue_depth.set(service.batcher.depth)
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return error_response(exc.status_code, str(exc.detail), "HTTPError")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return error_response(422, str(exc), "ValidationError")

    @app.exception_handler(BodyTooLarge)
    async def too_large(request, exc):
        return error_response(413, str(exc), "BodyTooLarge")

    from .page import add_page     # GET /: the explanation page (dconnx view)
    add_page(app, service, error_response, _status)
    return Guard(app, config, metrics)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        obj = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) +
               f".{int(record.msecs):03d}Z", "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        obj.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


def log_config(level: str) -> dict:
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {"version": 1, "disable_existing_loggers": False,
            "formatters": {"json": {"()": JsonFormatter}},
            "handlers": {"stderr": handler},
            "loggers": {name: {"handlers": ["stderr"], "level": level.upper(), "propagate": False}
                        for name in ("dconnx.serve", "uvicorn", "uvicorn.error")}}


def make_server(model, host: str, port: int, config: ServeConfig):
    """The uvicorn server of `dconnx serve` and `dconnx view` (one setup for both): the app, JSON
    logs, the header-timeout protocol and the connection cap. Run it with `.run()`."""
    import uvicorn
    from .protocol import guarded_h11
    app = create_app(model, config)
    return uvicorn.Server(uvicorn.Config(
        app, host=host, port=int(port), log_config=log_config(config.log_level), access_log=False,
        limit_concurrency=None if config.max_connections is None else 4 * config.max_connections,
        timeout_graceful_shutdown=5, http=guarded_h11(config.header_timeout_s)))


def run(model, host: str, port: int, config: ServeConfig) -> None:
    make_server(model, host, port, config).run()
