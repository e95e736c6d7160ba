"""`create_app`: the FastAPI application of `mechvis serve`, and `serve`, which runs it."""

from __future__ import annotations

import html
import secrets
import socket
import webbrowser
from importlib import resources
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from mechvis import load_model
from mechvis.errors import InvalidArgumentError, MechvisError
from mechvis.generation.decoding.decoder import prepare_decoding
from mechvis.serve.routers import export, generate, runs
from mechvis.serve.routers import model as model_router
from mechvis.serve.security import LOOPBACK_NAMES, SecurityMiddleware, is_loopback
from mechvis.serve.state import ServerState, get_state
from mechvis.serve.store import RunStore

STATIC = Path(__file__).parent / "static"


def _vendor_file(package: str, relative: str) -> Path:
    """A file shipped inside an installed package (plotly.js, circuitsvis' bundle): served from
    there, never copied into this repository."""
    return Path(str(resources.files(package).joinpath(relative)))


def create_app(
    model=None,
    *,
    model_name: str | None = None,
    model_roots=(),
    token: str | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    max_runs: int = 8,
    max_megabytes: float = 2048.0,
) -> FastAPI:
    """The app. `model`: a loaded hooked model (or None: load one from `model_roots` in the page).
    `token`: the per-process token every state-changing request must carry (None: none needed,
    loopback only). `host`: the bound address; a non-loopback one requires a token and also
    accepts its own name in the Host header. `port`: the bound port, which the Host header must
    name (the ASGI server's own report of its port wins; 0 or None: only that report)."""
    loopback = is_loopback(host)
    if not loopback and not token:
        raise InvalidArgumentError("Binding a non-loopback address needs a token (--token auto or a value).")
    app = FastAPI(title="mechvis serve", version="1", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json",
                  debug=False)
    state = ServerState(model=model, model_name=model_name, model_roots=tuple(Path(r) for r in model_roots),
                        store=RunStore(max_runs=max_runs, max_megabytes=max_megabytes), token=token, loopback=loopback)
    app.state.mechvis = state
    allowed = set(LOOPBACK_NAMES) | ({host} if not loopback and host not in ("0.0.0.0", "::") else set())
    if not loopback and host in ("0.0.0.0", "::"):
        allowed |= {socket.gethostname(), socket.getfqdn()}
    app.add_middleware(SecurityMiddleware, allowed_hosts=allowed, token=token, token_for_reads=not loopback,
                       port=port or None)


    app.include_router(model_router.router)
    app.include_router(generate.router)
    app.include_router(runs.router)
    app.include_router(export.router)

    @app.exception_handler(MechvisError)
    async def mechvis_error(request, error: MechvisError):
        return JSONResponse({"detail": str(error)}, status_code=422)

    index = (STATIC / "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(state: ServerState = Depends(get_state)) -> HTMLResponse:
        # Loopback: the page carries the token (only same-origin pages can read it: the Host
        # allow-list stops rebinding). Otherwise the page takes it from the printed URL.
        value = state.token if (state.loopback and state.token) else ""
        return HTMLResponse(index.replace("{{TOKEN}}", html.escape(value, quote=True)))

    vendors = {"plotly.min.js": ("plotly", "package_data/plotly.min.js"),
               "circuitsvis.js": ("circuitsvis", "dist/cdn/iife.js")}

    @app.get("/vendor/{name}", include_in_schema=False)
    def vendor(name: str) -> FileResponse:
        if name not in vendors:
            raise HTTPException(404)
        return FileResponse(_vendor_file(*vendors[name]), media_type="text/javascript")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            reason = error.strerror or str(error)
            raise InvalidArgumentError(f"Cannot listen on {host}:{port} ({reason}); pick another --host/--port, or --port 0 for a free one.") from error


def serve(
    model_name: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 5050,
    model_roots=(),
    token: str = "auto",
    open_browser: bool = False,
    load: bool = True,
    dtype: str = "float32",
) -> None:
    """Load the model, print the URL and serve until interrupted (`mechvis serve`)."""
    import uvicorn  # the optional `web` extra, needed only to run the server

    if token == "none":
        if not is_loopback(host):
            raise InvalidArgumentError("--token none is only allowed on a loopback address.")
        value = None
    else:
        value = secrets.token_urlsafe(24) if token == "auto" else token
        if len(value) < 16:
            raise InvalidArgumentError("--token must be at least 16 characters (or auto).")
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidArgumentError(f"--port must be in 0–65535 (0 picks a free port); got {port!r}.")
    missing = [str(root) for root in model_roots if not Path(root).is_dir()]
    if missing:
        raise InvalidArgumentError(f"--model-root must name existing directories; not found: {', '.join(missing)}.")
    _free(host, port)  # port 0 too: an unknown host fails here, before the model loads
    model = None
    if load:
        model = load_model(model_name, dtype=dtype)
        prepare_decoding(model)
    app = create_app(model, model_name=model_name or "embedded", model_roots=model_roots, token=value, host=host, port=port)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", server_header=False,
                            date_header=False, access_log=False)
    server = uvicorn.Server(config)

    original_startup = server.startup

    async def startup(sockets=None):
        await original_startup(sockets=sockets)
        bound = server.servers[0].sockets[0].getsockname()[1] if server.servers else port
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{bound}/" + ("" if is_loopback(host) or value is None else f"?token={value}")
        print(f"mechvis serve: {url}", flush=True)
        if not is_loopback(host):
            print(f"token (shown once): {value}", flush=True)
        if open_browser:
            webbrowser.open(url)

    server.startup = startup
    server.run()
