"""The labelling web app: Starlette, server-rendered pages, and a JSON API that mirrors them.

Every page and API call needs a session cookie (from signing in with a token at /login) or an
`Authorization: Bearer TOKEN` header; otherwise 401, also for a session older than its lifetime and for a revoked
user. Posts made with the cookie must also carry the session's CSRF token (form field `csrf` or header
`X-CSRF-Token`); bearer calls need none, since a browser never adds that header by itself. Feedback endpoints
take JSON (the API; 201 with the new id) or a form (the pages; 303 back to the page). Bad input stores nothing and
gets a clear 4xx: malformed body 400, unknown item 404, invalid field 422, replayed submission id 409, body over
the size limit 413.

The database is used from the event loop thread only (short transactions; SQLite serialises writers anyway);
generation runs in a worker thread, one at a time, so pages stay responsive while a model samples.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import random
import re
import uuid
from dataclasses import asdict
from datetime import timedelta

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from rlhfkit.feedback import progress, schema, store
from rlhfkit.feedback.store import User
from rlhfkit.label import pages
from rlhfkit.label.served import Generation, Models

COOKIE = "rlhfkit_session"
FEEDBACK = {"prompts": "prompt", "demonstrations": "demonstration", "rankings": "ranking",
            "comparisons": "comparison", "ratings": "rating"}
PAGE_OF = {"prompt": "/prompt", "demonstration": "/demonstrate", "ranking": "/rank", "comparison": "/chat",
           "rating": "/rate"}
INT_FIELDS = ("prompt_id", "item_id", "response_a", "response_b", "response_id", "supersedes")
JSON_FIELDS = ("ranking", "flags")
ASCII_DIGITS = re.compile(r"[0-9]+")
FLAGS = ("harmful or offensive", "makes things up", "contains personal information", "unreadable")


# --- the request pipeline: size limit, authentication, CSRF, body parsing ------------------------------------

class BodyLimit:
    """413 for bodies over `max_bytes`: by Content-Length up front, else while the body streams in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            return await JSONResponse({"error": f"request body over {self.max_bytes} bytes"}, 413)(
                scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, f"request body over {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


def wants_html(request: Request) -> bool:
    return not request.url.path.startswith("/api/")


def authenticate(request: Request) -> tuple[User, str | None]:
    """The signed-in user and the session's CSRF token (None for bearer tokens), or 401."""
    engine = request.app.state.db
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        user = store.user_by_token(engine, auth[7:].strip())
        if user:
            return user, None
    elif request.cookies.get(COOKIE):
        found = store.session_user(engine, request.cookies[COOKIE], request.app.state.session_lifetime)
        if found:
            return found
    raise HTTPException(401, "sign in first: a session cookie or an 'Authorization: Bearer TOKEN' header")


INT64 = 2**63  # SQLite's integers are signed 64-bit


def check_values(body: dict) -> None:
    """400 for what JSON allows but the database cannot store: text with a lone surrogate (not encodable as UTF-8)
    and integers outside SQLite's 64 bits. Walked with a stack, since a body may nest as deep as json.loads took."""
    todo: list = [body]
    while todo:
        value = todo.pop()
        if isinstance(value, dict):
            todo += [*value.keys(), *value.values()]
        elif isinstance(value, list):
            todo += value
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise HTTPException(400, "the body holds text that is not valid Unicode (a lone surrogate)") from None
        elif isinstance(value, int) and not -INT64 <= value < INT64:
            raise HTTPException(400, f"the number {value} is out of range (64-bit integers only)")


async def read_body(request: Request, csrf: str | None) -> tuple[dict, bool]:
    """The posted fields and whether they came from a form; checks the CSRF token of cookie sessions."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip()
    if ctype == "application/json":
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise HTTPException(400, "the body is not valid JSON") from None
        except RecursionError:
            raise HTTPException(400, "the body's JSON is nested too deeply") from None
        if not isinstance(body, dict):
            raise HTTPException(400, "the body must be a JSON object")
        sent_csrf, is_form = request.headers.get("x-csrf-token"), False
    elif ctype in ("application/x-www-form-urlencoded", "multipart/form-data"):
        body = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        sent_csrf, is_form = body.pop("csrf", None) or request.headers.get("x-csrf-token"), True
        for key in INT_FIELDS:
            if key in body:
                # ASCII digits only: str.isdigit() also admits "²", which int() refuses
                body[key] = None if body[key] == "" else int(body[key]) if ASCII_DIGITS.fullmatch(body[key]) \
                    else body[key]
        for key in JSON_FIELDS:
            if key in body:
                try:
                    body[key] = json.loads(body[key])
                except ValueError:
                    raise HTTPException(400, f"{key} is not valid JSON") from None
                except RecursionError:
                    raise HTTPException(400, f"{key}'s JSON is nested too deeply") from None
    else:
        raise HTTPException(415, "send application/json or a form")
    # in constant time, so a wrong guess's answer time says nothing about how much of it was right
    if csrf is not None and not hmac.compare_digest((sent_csrf or "").encode("utf-8", "replace"), csrf.encode()):
        raise HTTPException(403, "missing or wrong CSRF token; reload the page")
    check_values(body)
    return body, is_form


def error_response(request: Request, status: int, message: str) -> Response:
    if not wants_html(request):
        return JSONResponse({"error": message}, status)
    if status == 401:
        return pages.render("login.html", status=401, error=None, user=None, csrf="")
    return pages.render("error.html", status=status, message=message, user=None, csrf="")


async def on_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status", None) or getattr(exc, "status_code", 500)
    return error_response(request, status, str(getattr(exc, "detail", None) or exc))


# --- sign in / out ------------------------------------------------------------------------------------------

async def login_page(request: Request) -> Response:
    return pages.render("login.html", error=None, user=None, csrf="")


async def login(request: Request) -> Response:
    form = await request.form()
    user = store.user_by_token(request.app.state.db, str(form.get("token", "")).strip())
    if user is None:
        return pages.render("login.html", status=401, error="Unknown token.", user=None, csrf="")
    app = request.app.state
    cookie, _ = store.new_session(app.db, user, app.session_lifetime)
    response = RedirectResponse("/", 303)
    # Secure only when a TLS proxy fronts us: a browser would not send a Secure cookie back over plain http
    response.set_cookie(COOKIE, cookie, max_age=int(app.session_lifetime.total_seconds()), httponly=True,
                        samesite="strict", path="/", secure=app.behind_https)
    return response


async def logout(request: Request) -> Response:
    _, csrf = authenticate(request)
    await read_body(request, csrf)
    store.end_session(request.app.state.db, request.cookies.get(COOKIE, ""))
    response = RedirectResponse("/login", 303)
    response.delete_cookie(COOKIE, path="/", secure=request.app.state.behind_https)
    return response


# --- feedback -----------------------------------------------------------------------------------------------

async def submit(request: Request) -> Response:
    """POST /api/{prompts,demonstrations,rankings,comparisons,ratings}: store one submission."""
    user, csrf = authenticate(request)
    if request.path_params["kind"] not in FEEDBACK:
        raise HTTPException(404, f"no endpoint /api/{request.path_params['kind']}")
    kind = FEEDBACK[request.path_params["kind"]]
    body, is_form = await read_body(request, csrf)
    record_id = store.submit(request.app.state.db, user, kind, body)  # committed before we answer
    if is_form:
        return RedirectResponse(f"{PAGE_OF[kind]}?saved={kind}", 303)
    return JSONResponse({"kind": kind, "id": record_id, "submission_id": body["submission_id"]}, 201)


async def generate(request: Request, context: list[dict], picks: list[str]) -> list[tuple]:
    app = request.app.state
    if not app.models.names:
        raise HTTPException(503, "this server was started without --model, so it cannot generate responses")
    async with app.generate_lock:
        return await run_in_threadpool(app.models.sample, context, picks, app.generation)


def public_response(row: dict) -> dict:
    """A response as a labeller sees it: no model name, so comparisons stay blind."""
    return {"id": row["id"], "text": row["text"]}


async def queue(request: Request) -> Response:
    """GET /api/queue/{demonstration,ranking,rating}: the next item this labeller has not seen (made if need be)."""
    user, _ = authenticate(request)
    item = await next_item(request, user, request.path_params["kind"])
    return JSONResponse({"item": item})


async def next_item(request: Request, user: User, kind: str) -> dict | None:
    if kind not in ("demonstration", "ranking", "rating"):
        raise HTTPException(404, f"no queue {kind!r}; queues: demonstration, ranking, rating")
    app = request.app.state
    db = app.db
    async with app.queue_lock:  # two labellers asking at once must not both make an item for one prompt
        item_id = store.next_item(db, user, kind)
        if item_id is None and kind != "demonstration":
            item_id = await make_item(request, user, kind)
    if item_id is None:
        return None
    if kind == "demonstration":
        prompt = store.get(db, schema.prompts, item_id, "prompt")
        return {"prompt_id": prompt["id"], "prompt": prompt["text"]}
    if kind == "ranking":
        item = store.get(db, schema.rank_items, item_id, "rank item")
        shown = [store.get(db, schema.responses, r, "response") for r in item["response_ids"]]
        return {"item_id": item_id, "prompt_id": item["prompt_id"], "context": shown[0]["context"],
                "responses": [public_response(r) for r in shown]}
    response = store.get(db, schema.responses, item_id, "response")
    return {"response_id": item_id, "prompt_id": response["prompt_id"], "context": response["context"],
            "response": public_response(response)}


async def make_item(request: Request, user: User, kind: str) -> int | None:
    """A new rank item (K responses, the models taking turns) or a new response to rate, for the newest prompt
    without a rank item (or, for ratings, any prompt)."""
    app = request.app.state
    if not app.models.names:
        return None
    prompt_id = store.unranked_prompt(app.db) if kind == "ranking" else store.latest_prompt(app.db)
    if prompt_id is None:
        return None
    context = [{"role": "user", "content": store.get(app.db, schema.prompts, prompt_id, "prompt")["text"]}]
    k = app.generation.rank_k if kind == "ranking" else 1
    names, start = app.models.names, random.randrange(len(app.models.names))
    picks = [names[(start + i) % len(names)] for i in range(k)]
    random.shuffle(picks)  # the order shown says nothing about which model wrote what
    ids = store.add_responses(app.db, user, prompt_id, context, await generate(request, context, picks))
    item_id = store.add_rank_item(app.db, prompt_id, ids) if kind == "ranking" else ids[0]
    store.hand_out(app.db, user, kind, item_id)
    return item_id


async def chat_turn(request: Request) -> Response:
    """POST /api/chat/turn {messages, prompt_id?}: two candidate replies for the conversation so far, from two
    different models when more than one is served. The first user message becomes a prompt (its id comes back;
    send it with later turns)."""
    user, csrf = authenticate(request)
    body, _ = await read_body(request, csrf)
    db = request.app.state.db
    messages = store.check_messages(body.get("messages"))
    prompt_id = body.get("prompt_id")
    if prompt_id is None:
        first = next(m["content"] for m in messages if m["role"] == "user")
        prompt_id = store.submit(db, user, "prompt", {"submission_id": str(uuid.uuid4()), "text": first})
    else:
        store.get(db, schema.prompts, prompt_id, "prompt")
    names = request.app.state.models.names
    picks = random.sample(names, 2) if len(names) > 1 else names * 2
    ids = store.add_responses(db, user, prompt_id, messages, await generate(request, messages, picks))
    candidates = [public_response(store.get(db, schema.responses, i, "response")) for i in ids]
    return JSONResponse({"prompt_id": prompt_id, "candidates": candidates})


# --- reading back -------------------------------------------------------------------------------------------

async def me(request: Request) -> Response:
    user, _ = authenticate(request)
    return JSONResponse(asdict(user))


async def history(request: Request) -> Response:
    """GET /api/history: the caller's own records (never anyone else's)."""
    user, _ = authenticate(request)
    return JSONResponse(progress.history(request.app.state.db, user))


async def record(request: Request) -> Response:
    """GET /api/records/{kind}/{id}: one of the caller's records (admins: anyone's); 404 otherwise."""
    user, _ = authenticate(request)
    kind = request.path_params["kind"]
    if kind not in schema.KINDS:
        raise HTTPException(404, f"no record kind {kind!r}")
    row = store.get(request.app.state.db, schema.KINDS[kind], request.path_params["id"], kind)
    if row["labeller_id"] != user.id and not user.is_admin:
        raise HTTPException(404, f"no {kind} {row['id']}")  # the same answer as for a missing record
    return JSONResponse(row)


async def admin_stats(request: Request) -> Response:
    user, _ = authenticate(request)
    if not user.is_admin:
        raise HTTPException(403, "admins only")
    return JSONResponse(progress.stats(request.app.state.db))


# --- pages --------------------------------------------------------------------------------------------------

async def page(request: Request) -> Response:
    """The HTML pages: the same data as the API, rendered on the server (everything typed is escaped)."""
    user, csrf = authenticate(request)
    name = request.path_params.get("page", "home")
    db = request.app.state.db
    common = {"user": user, "csrf": csrf or "", "saved": request.query_params.get("saved"),
              "submission_id": str(uuid.uuid4())}
    if name == "home":
        return pages.render("home.html", counts={k: len(v) for k, v in progress.history(db, user).items()}, **common)
    if name == "prompt":
        return pages.render("prompt.html", **common)
    if name in ("demonstrate", "rank", "rate"):
        kind = {"demonstrate": "demonstration", "rank": "ranking", "rate": "rating"}[name]
        item = await next_item(request, user, kind)
        return pages.render(f"{name}.html", item=item, flags=FLAGS, can_generate=bool(request.app.state.models.names),
                            **common)
    if name == "chat":
        return pages.render("chat.html", strengths=schema.STRENGTHS, **common)
    if name == "history":
        return pages.render("history.html", records=progress.history(db, user), **common)
    if name == "admin":
        if not user.is_admin:
            raise HTTPException(403, "admins only")
        return pages.render("admin.html", stats=progress.stats(db), **common)
    raise HTTPException(404, f"no page /{name}")


async def static(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in pages.STATIC:
        raise HTTPException(404, "no such file")
    body, media = pages.STATIC[name]
    return Response(body, media_type=media, headers={"Cache-Control": "no-cache"})


class SecurityHeaders:
    """No inline script runs (CSP), pages are not framed, content types are not sniffed."""

    HEADERS = [(b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; "
                                            b"img-src 'self'; frame-ancestors 'none'; form-action 'self'"),
               (b"x-frame-options", b"DENY"), (b"x-content-type-options", b"nosniff"),
               (b"referrer-policy", b"no-referrer"), (b"cache-control", b"no-store")]

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message["headers"]}
                message["headers"] = list(message["headers"]) + [h for h in self.HEADERS if h[0] not in names]
            await send(message)

        await self.app(scope, receive, with_headers if scope["type"] == "http" else send)


def create_app(db: str, models: Models | None = None, generation: Generation | None = None,
               max_body_bytes: int = 64 * 1024, session_hours: float = 12.0, behind_https: bool = False) -> Starlette:
    """The app over database `db` (a path or SQLAlchemy URL), sampling from `models` (none: no generation).
    Sessions last `session_hours`; `behind_https` marks the session cookie Secure (a TLS proxy serves us)."""
    from starlette.middleware import Middleware

    routes = [
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/static/{name}", static),
        Route("/api/me", me),
        Route("/api/history", history),
        Route("/api/records/{kind}/{id:int}", record),
        Route("/api/admin/stats", admin_stats),
        Route("/api/queue/{kind}", queue),
        Route("/api/chat/turn", chat_turn, methods=["POST"]),
        Route("/api/{kind:str}", submit, methods=["POST"]),
        Route("/", page),
        Route("/{page}", page),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: on_error, store.StoreError: on_error},
                    middleware=[Middleware(SecurityHeaders), Middleware(BodyLimit, max_bytes=max_body_bytes)])
    app.state.db = store.open_engine(db)
    app.state.models = models or Models([])
    app.state.generation = generation or Generation()
    app.state.session_lifetime = timedelta(hours=session_hours)
    app.state.behind_https = behind_https
    app.state.generate_lock = asyncio.Lock()
    app.state.queue_lock = asyncio.Lock()
    return app
