"""The routes: the page, health, model info, and generate / reconstruct / edit (`add_routes` lists them).

Each request is checked completely (bodies, then `Checks` against the model and the limits) before its work
goes to the `WorkQueue`, under the ticket guards.AdmissionMiddleware took for it; the networks a job calls are made
`cancellable`, so a client that disconnects stops its generation at the next step. The routes find the loaded
pipeline and the rest through `app.state.served`.
"""

from __future__ import annotations

import base64
import functools
import io
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import editing
from ..generation import settings_record
from ..pipeline import Pipeline
from ..validators import resolve_seed
from .bodies import decode_image, image_body_doc, image_request, json_object
from .errors import ApiError, internal_error
from .guards import TICKET
from .limits import Checks, ServeLimits
from .schemas import (
    ErrorResponse,
    ImagesResponse,
    ReconstructRequest,
    ReconstructResponse,
    RequestBodies,
    given_settings,
    validate,
)
from .workqueue import Ticket, WorkQueue, cancellable


class ApiRoute(APIRoute):
    """A route that answers every failure in this API's one JSON shape: the endpoints read their bodies themselves
    (bodies.py: 400/415 with the reason, one 422 line naming each bad field), and anything unexpected becomes a
    logged 500, so the server keeps running."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                return await handle(request)
            except (ApiError, StarletteHTTPException, RequestValidationError):
                raise
            except Exception as e:  # noqa: BLE001 — the point: no request takes the server down
                raise internal_error(request, e) from e

        return handler


@dataclass(frozen=True)
class Served:
    """What the routes work with: the loaded pipeline, this server's limits and checks, the work queue, and the
    request bodies and page made with the app (their sampling settings those of the kinds registered then)."""

    pipe: Pipeline
    limits: ServeLimits
    queue: WorkQueue
    checks: Checks
    bodies: RequestBodies
    page: str


async def _served(request: Request) -> Served:
    # async: FastAPI would run a plain function in its thread pool, adding threads the work queue doesn't bound
    return request.app.state.served


ServedDep = Annotated[Served, Depends(_served)]


async def _ticket(request: Request) -> Ticket | None:
    return request.scope.get(TICKET)


TicketDep = Annotated[Ticket | None, Depends(_ticket)]

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 408, 413, 415, 422, 429, 500)
}


def _sampling(served: Served, req: BaseModel, kind: str) -> dict[str, Any]:
    """The request's sampling settings, the model's where it leaves one out, with steps capped by max_steps."""
    given = given_settings(req)
    try:
        settings = served.pipe.sampling_settings(kind, **given)
    except (ValueError, TypeError) as e:  # each field passed its own check; `kind`'s Settings may ask more
        raise ApiError(422, str(e)) from None
    if "num_steps" in settings:
        settings["num_steps"] = served.checks.steps(given.get("num_steps"), settings["num_steps"])
    return settings


def _png_base64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _image_record(image, seed: int, prompt: str, **meta: Any) -> dict[str, Any]:
    return {
        "png_base64": _png_base64(image),
        "seed": seed,
        "prompt": prompt,
        "width": image.width,
        "height": image.height,
        **meta,
    }


async def page(served: ServedDep) -> HTMLResponse:
    return HTMLResponse(
        served.page,
        headers={
            "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            "img-src data: blob:; connect-src 'self'; form-action 'none'; "
            "base-uri 'none'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-store",
        },
    )


async def healthz(served: ServedDep) -> dict[str, Any]:
    queue, limits = served.queue, served.limits
    return {
        "status": "ok",
        "running": queue.running,
        "admitted": queue.admitted,
        "max_concurrent": limits.max_concurrent,
        "max_queue": limits.max_queue,
    }


async def models(served: ServedDep) -> dict[str, Any]:
    pipe, tok = served.pipe, served.pipe.tokenizer.config
    return {
        "generators": sorted(pipe.generators),
        "image_size": pipe.config.image_size,
        "size_multiple": tok.size_multiple,
        "num_tokens": tok.num_tokens,
        "num_bits": tok.num_bits,
        "trained": pipe.config.trained,
        "description": pipe.config.description,
        "text_encoder": pipe.config.text_encoder,
        "limits": asdict(served.limits),
        "sampling": {g: pipe.sampling_settings(g) for g in sorted(pipe.generators)},
        "can_edit": editing.edit_generator(pipe.generators) in pipe.generators,
    }


async def generate(request: Request, served: ServedDep, ticket: TicketDep) -> JSONResponse:
    req = validate(served.bodies.generate, await json_object(request))
    pipe, checks = served.pipe, served.checks
    if (req.prompt is None) == (req.prompts is None):
        raise ApiError(
            422,
            "prompt: give either `prompt` (one text) or `prompts` (a list of texts)"
            if req.prompt is None
            else "prompt: give `prompt` or `prompts`, not both",
        )
    if req.prompt is not None:
        prompts = [checks.prompt(req.prompt)]
    else:
        if not req.prompts:
            raise ApiError(422, "prompts: empty list; give at least one prompt")
        prompts = [checks.prompt(p, f"prompts[{i}]") for i, p in enumerate(req.prompts)]
    checks.generator(req.generator)
    settings = _sampling(served, req, req.generator)
    checks.count(len(prompts) * req.n, f"{len(prompts)} prompt(s) x n={req.n}")
    height, width = checks.size(req.size)
    expanded = [p for p in prompts for _ in range(req.n)]
    seed = resolve_seed(req.seed)

    def work() -> list[dict[str, Any]]:
        cancellable(pipe.generators[req.generator])
        out = pipe(expanded, kind=req.generator, seed=seed, height=height, width=width, progress=False, **settings)
        meta = {"generator": req.generator, **settings_record(req.generator, settings)}
        return [_image_record(im, s, p, **meta) for im, s, p in zip(out.images, out.seeds, out.prompts)]

    images, waited, worked = await served.queue.run(work, ticket)
    return JSONResponse(
        {"images": images, "timing_s": round(worked, 4), "queue_s": round(waited, 4), "trained": pipe.config.trained}
    )


async def reconstruct(request: Request, served: ServedDep, ticket: TicketDep) -> JSONResponse:
    req, data = await image_request(request, ReconstructRequest)
    pipe, tok = served.pipe, served.pipe.tokenizer.config
    height, width = served.checks.size(req.size)

    def work() -> dict[str, Any]:
        out = editing.reconstruct(pipe, decode_image(data), height, width)
        assert out.bits is not None  # reconstruct returns the bits it decoded
        return {
            "bits_hex": editing.pack_bits_hex(out.bits[0]),
            "num_tokens": tok.num_tokens,
            "num_bits": tok.num_bits,
            "png_base64": _png_base64(out.images[0]),
            "width": width,
            "height": height,
        }

    result, waited, worked = await served.queue.run(work, ticket)
    return JSONResponse(result | {"timing_s": round(worked, 4), "queue_s": round(waited, 4)})


async def edit(request: Request, served: ServedDep, ticket: TicketDep) -> JSONResponse:
    req, data = await image_request(request, served.bodies.edit)
    pipe, checks = served.pipe, served.checks
    prompt = checks.prompt(req.prompt)
    kind = editing.edit_generator(pipe.generators)
    checks.generator(kind)
    settings = _sampling(served, req, kind)
    checks.count(req.n, f"n={req.n}")
    height, width = checks.size(req.size)
    seed = resolve_seed(req.seed)

    def work() -> list[dict[str, Any]]:
        cancellable(pipe.generators[kind])
        out = editing.edit(
            pipe,
            decode_image(data),
            prompt,
            strength=req.strength,
            seed=seed,
            height=height,
            width=width,
            num_images=req.n,
            **settings,
        )
        meta = {"generator": kind, "strength": req.strength, **settings_record(kind, settings)}
        return [_image_record(im, s, prompt, **meta) for im, s in zip(out.images, out.seeds)]

    images, waited, worked = await served.queue.run(work, ticket)
    return JSONResponse(
        {"images": images, "timing_s": round(worked, 4), "queue_s": round(waited, 4), "trained": pipe.config.trained}
    )


def _json_body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI text for a JSON body read by hand (the bodies are made with the app, so no signature names them)."""
    content = {"application/json": {"schema": model.model_json_schema()}}
    return {"requestBody": {"required": True, "content": content}}


def add_routes(router: APIRouter, bodies: RequestBodies) -> None:
    """Put the API's routes on `router`, each an ApiRoute, documented with `bodies`. Given the app's own router
    (`app.router`), so that `app.routes` lists them: newer FastAPI keeps an included router's routes out of that
    list."""
    add = functools.partial(router.add_api_route, route_class_override=ApiRoute)
    add("/", page, methods=["GET"], response_class=HTMLResponse, include_in_schema=False)
    add("/healthz", healthz, methods=["GET"], summary="liveness and load")
    add("/v1/models", models, methods=["GET"], summary="what the loaded model can do, and this server's limits")
    add(
        "/v1/generate",
        generate,
        methods=["POST"],
        summary="images from prompts",
        openapi_extra=_json_body_doc(bodies.generate),
        responses={200: {"model": ImagesResponse}, **_ERRORS},
    )
    add(
        "/v1/reconstruct",
        reconstruct,
        methods=["POST"],
        summary="an image's bits and what the tokenizer makes of them",
        openapi_extra=image_body_doc(ReconstructRequest),
        responses={200: {"model": ReconstructResponse}, **_ERRORS},
    )
    add(
        "/v1/edit",
        edit,
        methods=["POST"],
        summary="re-draw an image under a new prompt (diffusion from t = strength)",
        openapi_extra=image_body_doc(bodies.edit),
        responses={200: {"model": ImagesResponse}, **_ERRORS},
    )
