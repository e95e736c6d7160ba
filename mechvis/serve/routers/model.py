"""GET /api/state, GET /api/models, POST /api/models/load, POST /api/images."""

from __future__ import annotations

import io
import uuid
from dataclasses import asdict

from fastapi import APIRouter, Depends, HTTPException, Request
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from mechvis import inspect_model
from mechvis.errors import MechvisError
from mechvis.generation.decoding.decoder import prepare_decoding
from mechvis.serve.state import ServerState, get_state, list_model_dirs, load_from_root, resolve_model_dir

router = APIRouter(prefix="/api", tags=["model"])
MAX_PIXELS = 16_000_000  # 4000 × 4000: bigger images are refused before decoding
MAX_IMAGES = 8


class ServerStatus(BaseModel):
    status: str
    model: dict | None
    model_name: str | None
    vlm: bool
    runs: list[str]
    store_megabytes: float


def card(model) -> dict:
    summary = inspect_model(model)
    return {**asdict(summary), "vlm": getattr(model, "processor", None) is not None}


@router.get("/state", response_model=ServerStatus)
def server_state(state: ServerState = Depends(get_state)) -> ServerStatus:
    """The `inspect` card of the loaded model and whether the server is idle, generating or analysing."""
    if state.model is not None and state.card is None:
        state.card = card(state.model)
    return ServerStatus(status=state.status, model=state.card, model_name=state.model_name,
                        vlm=bool(state.card and state.card["vlm"]), runs=state.store.ids(),
                        store_megabytes=round(state.store.total_bytes / 2**20, 1))


class ModelList(BaseModel):
    models: list[str]


@router.get("/models", response_model=ModelList)
def models(state: ServerState = Depends(get_state)) -> ModelList:
    """Model directories (safetensors weights) inside the --model-root directories."""
    return ModelList(models=list_model_dirs(state.model_roots))


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=255)


@router.post("/models/load", response_model=ServerStatus)
def load(body: LoadRequest, state: ServerState = Depends(get_state)) -> ServerStatus:
    """Load a model directory from a --model-root (safetensors only, never remote code)."""
    try:
        directory = resolve_model_dir(state.model_roots, body.name)
    except MechvisError as error:
        raise HTTPException(403, str(error)) from error
    if not state.generation_lock.acquire(blocking=False):
        raise HTTPException(409, "busy: a generation is running.")
    try:
        state.status = "loading"
        state.model = load_from_root(directory)
        prepare_decoding(state.model)
        state.model_name, state.card = body.name, None
        state.model_extras.clear()
    except MechvisError as error:
        raise HTTPException(422, str(error)) from error
    finally:
        state.status = "idle"
        state.generation_lock.release()
    return server_state(state)


class ImageUploaded(BaseModel):
    id: str
    width: int
    height: int


@router.post("/images", response_model=ImageUploaded, openapi_extra={
    "requestBody": {"content": {t: {"schema": {"type": "string", "format": "binary"}}
                                for t in ("image/png", "image/jpeg", "image/webp", "image/gif")}}})
async def upload_image(request: Request, state: ServerState = Depends(get_state)) -> ImageUploaded:
    """An image for a vision-language model, as the raw body (≤ 10 MiB, ≤ 16 megapixels)."""

    data = await request.body()
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        width, height = image.size
        if width * height > MAX_PIXELS or width < 1 or height < 1:
            raise HTTPException(413, f"The image is {width}×{height}; at most {MAX_PIXELS // 1_000_000} megapixels.")
        image = image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise HTTPException(415, f"Not a readable image ({type(error).__name__}).") from error
    image_id = uuid.uuid4().hex
    state.images[image_id] = image
    while len(state.images) > MAX_IMAGES:
        state.images.pop(next(iter(state.images)))
    return ImageUploaded(id=image_id, width=width, height=height)
