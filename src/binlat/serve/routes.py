"""The routes: the page, health, model info, and generate / reconstruct / edit (`add_routes` lists them).

Each request is checked completely (bodies, then `Checks` against the model and the limits) before its work
goes to the `WorkQueue`, under the ticket guards.AdmissionMiddleware took for it; the networks a job calls are made
`cancellable`, so a client that disconnects stops its generation at the next step. The routes find the loaded
pipeline and the rest through `app.state.served`.
"""

from __future__ import annotations

import base64
import functools
import inspect
import io
import typing
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
from .page import PAGE
from .schemas import (
    EditRequest,
    ErrorResponse,
    GenerateRequest,
    ImagesResponse,
    ReconstructRequest,
    ReconstructResponse,
    Sampling,
    validation_message,
)
from .workqueue import Ticket, WorkQueue, cancellable


def _body_model(endpoint: Callable[..., Any]) -> type[BaseModel] | None:
    """The pydantic model an endpoint takes as its typed JSON body, if any."""
    hints = typing.get_type_hints(endpoint)
    hints.pop("return", None)
    return next((t for t in hints.values() if inspect.isclass(t) and issubclass(t, BaseModel)), None)


class ApiRoute(APIRoute):
    """A route that answers every failure in this API's one JSON shape: a typed body is checked to be a JSON
    object before FastAPI parses it (400/415 with the reason), its validation errors become one 422 line naming
    each bad field, and anything unexpected becomes a logged 500, so the server keeps running."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()
        model = _body_model(self.endpoint)

        async def handler(request: Request) -> Response:
            try:
                if model is not None:
                    await json_object(request)  # FastAPI reads the same cached body afterwards
                return await handle(request)
            except (ApiError, StarletteHTTPException):
                raise
            except RequestValidationError as e:
                if model is None:
                    raise
                raise ApiError(422, validation_message(e.errors(), model)) from None
            except Exception as e:  # noqa: BLE001 — the point: no request takes the server down
                raise internal_error(request, e) from e

        return handler


@dataclass(frozen=True)
class Served:
    """What the routes work with: the loaded pipeline, this server's limits and checks, and the work queue."""

    pipe: Pipeline
    limits: ServeLimits
    queue: WorkQueue
    checks: Checks


async def _served(request: Request) -> Served:
    # async: FastAPI would run a plain function in its thread pool, adding threads the work queue doesn't bound
    return request.app.state.served


ServedDep = Annotated[Served, Depends(_served)]


async def _ticket(request: Request) -> Ticket | None:
    return request.scope.get(TICKET)


TicketDep = Annotated[Ticket | None, Depends(_ticket)]

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 408, 413, 415, 422, 429, 500)}


def _sampling(pipe: Pipeline, req: Sampling, generator: str) -> dict[str, Any]:
    return pipe.sampling_settings(
        generator, guidance_scale=req.guidance_scale, temperature=req.temperature, rho=req.rho, protocol=req.protocol
    )


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


async def page() -> HTMLResponse:
    return HTMLResponse(
        PAGE,
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


async def generate(req: GenerateRequest, served: ServedDep, ticket: TicketDep) -> JSONResponse:
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
    settings = _sampling(pipe, req, req.generator)
    steps = checks.steps(req.num_steps, settings["num_steps"])
    checks.count(len(prompts) * req.n, f"{len(prompts)} prompt(s) x n={req.n}")
    height, width = checks.size(req.size)
    expanded = [p for p in prompts for _ in range(req.n)]
    seed = resolve_seed(req.seed)

    def work() -> list[dict[str, Any]]:
        cancellable(pipe.generators[req.generator])
        out = pipe(
            expanded,
            generator=req.generator,
            num_steps=steps,
            guidance_scale=settings["guidance_scale"],
            temperature=settings["temperature"],
            rho=settings["rho"],
            protocol=settings["protocol"],
            seed=seed,
            height=height,
            width=width,
            progress=False,
        )
        meta = {"generator": req.generator, **settings_record(req.generator, settings | {"num_steps": steps})}
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
    req, data = await image_request(request, EditRequest)
    pipe, checks = served.pipe, served.checks
    prompt = checks.prompt(req.prompt)
    kind = editing.edit_generator(pipe.generators)
    checks.generator(kind)
    settings = _sampling(pipe, req, kind)
    steps = checks.steps(req.num_steps, settings["num_steps"])
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
            num_steps=steps,
            guidance_scale=settings["guidance_scale"],
            temperature=settings["temperature"],
            rho=settings["rho"],
            protocol=settings["protocol"],
            seed=seed,
            height=height,
            width=width,
            num_images=req.n,
        )
        meta = {"generator": kind, "strength": req.strength, **settings_record(kind, settings | {"num_steps": steps})}
        return [_image_record(im, s, prompt, **meta) for im, s in zip(out.images, out.seeds)]

    images, waited, worked = await served.queue.run(work, ticket)
    return JSONResponse(
        {"images": images, "timing_s": round(worked, 4), "queue_s": round(waited, 4), "trained": pipe.config.trained}
    )


def add_routes(router: APIRouter) -> None:
    """Put the API's routes on `router`, each an ApiRoute. Given the app's own router (`app.router`), so that
    `app.routes` lists them: newer FastAPI keeps an included router's routes out of that list."""
    add = functools.partial(router.add_api_route, route_class_override=ApiRoute)
    add("/", page, methods=["GET"], response_class=HTMLResponse, include_in_schema=False)
    add("/healthz", healthz, methods=["GET"], summary="liveness and load")
    add("/v1/models", models, methods=["GET"], summary="what the loaded model can do, and this server's limits")
    add(
        "/v1/generate",
        generate,
        methods=["POST"],
        summary="images from prompts",
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
        openapi_extra=image_body_doc(EditRequest),
        responses={200: {"model": ImagesResponse}, **_ERRORS},
    )
