"""The dashboard's routes: server-rendered pages, POST actions and `/metrics`.

Owns the HTTP side only. Reads go through `web.queries`, state changes through `store`
(requeue, cancel, delete, clear), access and CSRF through `web.security`. Every page works
without JavaScript; every action is a POST form answered by a 303 redirect to a page.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlencode

import jinja2
import prometheus_client
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from dbqueue import bus, config, control, database, errors, stats, store
from dbqueue.schema import Status
from dbqueue.web import chart, display, history, metrics, queries, refresh, security

PAGE_SIZE = 50
STALE_AFTER = 15.0  # seconds: `dbqueue work --rescue-after`'s default
# No script runs on these pages but the reload one, allowed by its hash, and no other site
# may frame them: a framed dashboard would let another page trick an operator into pressing
# its buttons (clickjacking).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        f"default-src 'none'; script-src {refresh.CSP_SOURCE}; style-src 'unsafe-inline'; "
        "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
Endpoint = Callable[[Request], Awaitable[Response]]
T = TypeVar("T")

# Messages shown after an action's redirect: codes in the URL, text here, so a link cannot
# make the dashboard display words of someone else's choosing.
DONE = {
    "retried": "Task queued again.",
    "cancelled": "Task cancelled.",
    "cancel-requested": (
        "Cancel requested: the task is running, so its worker is asked to stop it. It raises "
        "TaskCancelled in the task within about a second and records it cancelled."
    ),
    "deleted": "Task deleted.",
    "unchanged": "Nothing changed: the task is no longer in a state that allows this.",
    "queue-retried": "Failed tasks of the queue queued again.",
    "queue-cleared": "Queued tasks of the queue deleted.",
    "queue-paused": (
        "Queue paused: workers stop claiming its tasks within a second; running tasks finish "
        "and new tasks can still be enqueued."
    ),
    "queue-resumed": "Queue resumed: workers claim its tasks again.",
    "bulk-retried": "{n} matching failed or cancelled task(s) queued again.",
    "bulk-cancelled": (
        "{n} matching queued task(s) cancelled; {m} running task(s) asked to stop (each "
        "worker raises TaskCancelled in its task within about a second and records it)."
    ),
}
# Bulk actions on a filtered task list: the statuses each one applies to.
BULK = {
    "retry": (Status.FAILED.value, Status.CANCELLED.value),
    "cancel": (Status.QUEUED.value, Status.RUNNING.value),
}
CHUNK = 1000  # ids per statement in a bulk action (well under SQLite's bound-variable limit)


class Dashboard:
    """One dashboard: its settings, templates, guard and metrics registry."""

    def __init__(
        self, settings: config.Settings | None, token: str | None, secret: bytes | None
    ) -> None:
        self._settings = settings
        self._secret = secret
        self._token = token
        self._guard: security.Guard | None = None
        self._registry: prometheus_client.CollectorRegistry | None = None
        self.history = history.ThroughputHistory()
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("dbqueue.web", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.templates.filters.update(
            age=display.age, timestamp=display.timestamp, short=display.short_repr
        )

    @property
    def settings(self) -> config.Settings:
        """The settings given, else dbqueue's default as configured when first needed."""
        return self._settings or config.current()

    @property
    def guard(self) -> security.Guard:
        if self._guard is None:
            secret = self._secret or security.derive_secret(self.settings.keyring().current)
            self._guard = security.Guard(secret, self._token)
        return self._guard

    def read(self, body: Callable[[sa.Connection], Any]) -> Any:
        """Run read-only statements in one short transaction."""
        settings = self.settings
        with database.errors_translated(settings), settings.get_engine().connect() as conn:
            try:
                stats.without_jit(conn)
                return body(conn)
            finally:
                conn.rollback()

    def write(self, body: Callable[[sa.Connection], T]) -> T:
        settings = self.settings
        with database.errors_translated(settings), settings.get_engine().begin() as conn:
            return body(conn)

    def render(
        self,
        request: Request,
        template: str,
        status_code: int = 200,
        *,
        live: bool = False,
        **ctx: Any,
    ) -> Response:
        """A page; `live`: it shows changing state, so it may reload itself (web/refresh.py)."""
        session_id, new = self.guard.session_id(request)
        reloads, remember = refresh.wanted(request)
        root = str(request.scope.get("root_path", "")).rstrip("/")
        html = self.templates.get_template(template).render(
            root=root,
            path=request.url.path,
            csrf_field=security.CSRF_FIELD,
            csrf=self.guard.csrf_token(session_id),
            login_required=self.guard.token is not None,
            done=_done_message(request),
            live=live,
            reloads=live and reloads,
            refresh_script=refresh.SCRIPT,
            refresh_toggle=refresh.toggle_href(request, reloads),
            refresh_seconds=refresh.SECONDS,
            **ctx,
        )
        response = HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)
        if new:
            self.guard.set_session_cookie(response, request, session_id)
        if remember is not None:
            refresh.remember(response, request, remember)
        return response

    def redirect(self, request: Request, path: str, **query: str) -> Response:
        root = str(request.scope.get("root_path", "")).rstrip("/")
        suffix = f"?{urlencode(query)}" if query else ""
        return RedirectResponse(root + path + suffix, status_code=303)

    # -- access checks ------------------------------------------------------------------------

    def page(self, endpoint: Endpoint) -> Endpoint:
        """A GET endpoint: needs the access token when one is configured."""

        async def checked(request: Request) -> Response:
            if not self.guard.authorized(request):
                if request.headers.get("authorization") or request.url.path.endswith("/metrics"):
                    return PlainTextResponse(
                        "access token required (Authorization: Bearer <DBQUEUE_WEB_TOKEN>)",
                        status_code=401,
                        headers={"WWW-Authenticate": "Bearer"},
                    )
                return self.redirect(request, "/login", next=request.url.path)
            return await endpoint(request)

        return checked

    def action(self, endpoint: Callable[[Request, Any], Awaitable[Response]]) -> Endpoint:
        """A POST endpoint: needs the access token and a valid CSRF token, checked first."""

        async def checked(request: Request) -> Response:
            if not self.guard.authorized(request):
                return PlainTextResponse("access token required", status_code=401)
            form = await request.form()
            if not self.guard.csrf_valid(request, form):
                return PlainTextResponse(
                    "CSRF token missing or invalid: reload the dashboard page and try again",
                    status_code=403,
                )
            return await endpoint(request, form)

        return checked

    # -- pages ----------------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        span = request.query_params.get("chart", "hour")
        if span not in chart.RANGES:
            raise HTTPException(400, f"unknown chart {span!r}; expected one of hour, day")
        step, buckets, label_every, heading = chart.RANGES[span]
        queues, paused, workers, throughput = await run_in_threadpool(
            self.read,
            lambda c: (
                queries.overview(c),
                control.read_paused(c),
                queries.list_workers(c),
                self.history.read(c, step, buckets),
            ),
        )
        return self.render(
            request,
            "overview.html",
            live=True,
            queues=queries.with_idle_queues(queues, paused),
            paused=paused,
            charts=chart.charts(throughput, label_every),
            chart_span=span,
            chart_heading=heading,
            workers=workers[0],
            now=workers[1],
            window_minutes=int(queries.THROUGHPUT_WINDOW // 60),
            exact_up_to=stats.EXACT_FINISHED_UP_TO,
            queued_up_to=stats.EXACT_QUEUED_UP_TO,
        )

    async def tasks(self, request: Request) -> Response:
        wanted = _task_filter(request.query_params)
        page = _positive_int(request.query_params.get("page", "1"), "page")
        rows, total, now = await run_in_threadpool(
            self.read,
            lambda c: queries.list_tasks(c, wanted, PAGE_SIZE, (page - 1) * PAGE_SIZE),
        )
        names = await run_in_threadpool(self.read, queries.queue_names)
        pages = max(1, math.ceil(total / PAGE_SIZE))
        counted_up_to = max(queries.COUNT_UP_TO, page * PAGE_SIZE)  # list_tasks counts no further

        def link(n: int) -> str:
            return f"?{urlencode({**wanted.params(), 'page': n})}"

        return self.render(
            request,
            "tasks.html",
            live=True,
            rows=rows,
            total=total,
            now=now,
            status=wanted.status or "",
            queue=wanted.queue or "",
            search=wanted.search or "",
            filter_fields=wanted.params(),
            statuses=queries.FILTERS,
            queue_names=names,
            page=page,
            pages=pages,
            more_than=counted_up_to if total > counted_up_to else None,
            prev_link=link(page - 1) if page > 1 else None,
            next_link=link(page + 1) if page < pages else None,
        )

    async def task(self, request: Request) -> Response:
        task_id = int(request.path_params["task_id"])
        row, now = await run_in_threadpool(
            self.read, lambda c: (store.get(c, task_id), queries.now(c))
        )
        if row is None:
            raise HTTPException(404, f"task {task_id} does not exist (it may have been pruned)")
        settings = self.settings
        args, kwargs = await run_in_threadpool(display.arguments, settings, row)
        result = await run_in_threadpool(display.result, settings, row)
        return self.render(
            request,
            "task.html",
            live=True,
            task=row,
            now=now,
            args=args,
            kwargs=kwargs,
            result=result,
            can_retry=row.status in (Status.FAILED.value, Status.CANCELLED.value),
            can_cancel=row.status == Status.QUEUED.value
            or (row.status == Status.RUNNING.value and row.cancel_requested_at is None),
            can_delete=row.status != Status.RUNNING.value,
        )

    async def workers(self, request: Request) -> Response:
        rows, now = await run_in_threadpool(self.read, queries.list_workers)
        return self.render(
            request, "workers.html", live=True, workers=rows, now=now, stale_after=STALE_AFTER
        )

    async def counters(self, request: Request) -> Response:
        rows = await run_in_threadpool(self.read, queries.pending_counters)
        return self.render(request, "counters.html", rows=rows)

    async def bus(self, request: Request) -> Response:
        rows = await run_in_threadpool(self.read, bus.list_subscriptions)
        apps: dict[str, list[Any]] = {}
        for row in rows:
            apps.setdefault(row.app_key, []).append(row)
        return self.render(request, "bus.html", apps=apps)

    async def metrics(self, request: Request) -> Response:
        if self._registry is None:
            self._registry = metrics.make_registry(self.settings.get_engine())
        registry = self._registry
        body = await run_in_threadpool(
            lambda: _translated(self.settings, lambda: prometheus_client.generate_latest(registry))
        )
        return Response(body, media_type=prometheus_client.CONTENT_TYPE_LATEST)

    # -- actions --------------------------------------------------------------------------------

    async def task_action(self, request: Request, form: Any) -> Response:
        task_id = int(request.path_params["task_id"])
        verb = request.path_params["verb"]
        change: dict[str, Callable[[sa.Connection], str | None]] = {
            "retry": lambda c: "retried" if store.requeue(c, [task_id]) else None,
            "cancel": lambda c: _cancel_one(c, task_id),
            "delete": lambda c: "deleted" if store.delete(c, [task_id]) else None,
        }
        if verb not in change:
            raise HTTPException(404, f"no action {verb!r}; expected retry, cancel or delete")
        done = await run_in_threadpool(self.write, change[verb])
        if done is None:
            return self.redirect(request, f"/tasks/{task_id}", done="unchanged")
        if done == "deleted":
            return self.redirect(request, "/tasks", done=done)
        return self.redirect(request, f"/tasks/{task_id}", done=done)

    async def queue_action(self, request: Request, form: Any) -> Response:
        verb = request.path_params["verb"]
        queue = form.get("queue")
        if not isinstance(queue, str) or not queue:
            raise HTTPException(400, "the form must name a queue (field 'queue')")
        change: dict[str, Callable[[sa.Connection], object]] = {
            "retry-failed": lambda c: store.requeue(c, all_failed=True, queues=[queue]),
            "clear": lambda c: store.clear(c, [queue]),
            "pause": lambda c: control.set_paused(c, [queue], True),
            "resume": lambda c: control.set_paused(c, [queue], False),
        }
        if verb not in change:
            raise HTTPException(
                404, f"no queue action {verb!r}; expected retry-failed, clear, pause or resume"
            )
        try:
            await run_in_threadpool(self.write, change[verb])
        except errors.ConfigurationError as exc:  # a queue name too long to be one
            raise HTTPException(400, str(exc)) from None
        done = {
            "retry-failed": "queue-retried",
            "clear": "queue-cleared",
            "pause": "queue-paused",
            "resume": "queue-resumed",
        }[verb]
        return self.redirect(request, "/", done=done)

    async def bulk_action(self, request: Request, form: Any) -> Response:
        """Retry or cancel every task of a filtered list: first a page that counts them and
        asks to confirm; the confirmed form acts on the tasks counted (ids up to the highest
        one seen), so a task enqueued or failed meanwhile is not swept in unseen."""
        verb = request.path_params["verb"]
        if verb not in BULK:
            raise HTTPException(404, f"no bulk action {verb!r}; expected retry or cancel")
        wanted = _task_filter(form)
        statuses = BULK[verb]
        up_to = form.get("up_to")
        if up_to is None:
            count, highest = await run_in_threadpool(
                self.read, lambda c: queries.bulk_extent(c, wanted, statuses)
            )
            return self.render(
                request,
                "confirm.html",
                verb=verb,
                statuses=statuses,
                count=count,
                up_to=highest,
                wanted=wanted,
                filter_fields=wanted.params(),
            )
        last = _positive_int(str(up_to), "up_to")

        def act(conn: sa.Connection) -> dict[str, str]:
            targets = queries.bulk_targets(conn, wanted, statuses, last)
            if verb == "retry":
                ids = sorted(targets)
                n = sum(store.requeue(conn, ids[i : i + CHUNK]) for i in range(0, len(ids), CHUNK))
                return {"done": "bulk-retried", "n": str(n)}
            done = control.Cancelled()
            items = sorted(targets.items())
            for i in range(0, len(items), CHUNK):
                part = control.cancel_unfinished(conn, dict(items[i : i + CHUNK]))
                done.cancelled += part.cancelled
                done.requested += part.requested
            return {
                "done": "bulk-cancelled",
                "n": str(len(done.cancelled)),
                "m": str(len(done.requested)),
            }

        outcome = await run_in_threadpool(self.write, act)
        return self.redirect(request, "/tasks", **wanted.params(), **outcome)

    # -- login ----------------------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        if self.guard.token is None:
            return self.redirect(request, "/")
        return self.render(request, "login.html", next=_local_path(request), failed=False)

    async def login(self, request: Request) -> Response:
        """POST /login: CSRF-checked like every form; sets the access cookie on the right token."""
        form = await request.form()
        if not self.guard.csrf_valid(request, form):
            return PlainTextResponse(
                "CSRF token missing or invalid: reload the login page", status_code=403
            )
        if self.guard.token is None:
            return self.redirect(request, "/")
        token = form.get("token")
        if not isinstance(token, str) or not self.guard.token_matches(token):
            return self.render(
                request, "login.html", status_code=401, next=_local_path(request), failed=True
            )
        response = self.redirect(request, _local_path(request, form.get("next")))
        self.guard.set_auth_cookie(response, request)
        return response

    # -- errors ---------------------------------------------------------------------------------

    async def http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return self.render(request, "error.html", status_code=exc.status_code, message=exc.detail)

    async def database_error(self, request: Request, exc: Exception) -> Response:
        return self.render(request, "error.html", status_code=503, message=str(exc))


def _task_filter(fields: Any) -> queries.TaskFilter:
    """The task list's filter from query parameters or a form; 400 on an unknown status."""

    def text(name: str) -> str | None:
        value = fields.get(name)
        return value.strip() or None if isinstance(value, str) else None

    status = text("status")
    if status is not None and status not in queries.FILTERS:
        raise HTTPException(
            400, f"unknown status {status!r}; expected one of {', '.join(queries.FILTERS)}"
        )
    search = text("q")
    if search is not None and len(search) > 200:
        raise HTTPException(400, "the search is at most 200 characters")
    return queries.TaskFilter(status=status, queue=text("queue"), search=search)


def _cancel_one(conn: sa.Connection, task_id: int) -> str | None:
    """Cancel a queued task now, or ask a running task's worker to stop it."""
    done = control.cancel_unfinished(conn, store.statuses(conn, [task_id]))
    return "cancelled" if done.cancelled else "cancel-requested" if done.requested else None


def _done_message(request: Request) -> str | None:
    """The message for `?done=CODE`; counts (`n`, `m`) are read as numbers, nothing else."""
    text = DONE.get(request.query_params.get("done", ""))
    if text is None or "{" not in text:
        return text
    counts = {}
    for name in ("n", "m"):
        value = request.query_params.get(name, "")
        counts[name] = int(value) if value.isdigit() and len(value) < 10 else 0
    return text.format(**counts)


def _translated(settings: config.Settings, body: Callable[[], bytes]) -> bytes:
    with database.errors_translated(settings):
        return body()


def _positive_int(text: str, name: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise HTTPException(400, f"{name} must be a whole number, not {text!r}") from None
    if value < 1:
        raise HTTPException(400, f"{name} must be 1 or more, not {value}")
    return value


def _local_path(request: Request, candidate: Any = None) -> str:
    """Where to go after login: a path inside the dashboard, never another site."""
    value = candidate if isinstance(candidate, str) else request.query_params.get("next", "/")
    root = str(request.scope.get("root_path", "")).rstrip("/")
    if root and value.startswith(root + "/"):
        value = value[len(root) :]
    if not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def create_app(
    settings: config.Settings | None = None,
    token: str | None = None,
    *,
    secret: bytes | None = None,
    debug: bool = False,
) -> Starlette:
    """The dashboard as an ASGI app, to serve alone (`dbqueue web`) or mount in another app.

    `app.mount("/admin/queue", dbqueue.web.create_app())` (FastAPI, Starlette): links,
    redirects and cookies follow the mount path. Put your application's own authentication in
    front of it, or give it a `token`. Every page is read from the tables at each request;
    every button is a POST form with a CSRF token.

    Args:
        settings: which database and keys. Default: dbqueue's configured default, looked up
            at the first request. The keys must be the workers' to show arguments and results.
        token: when given, every request needs it: `Authorization: Bearer <token>` (for
            Prometheus) or the cookie the `/login` form sets.
        secret: the key for the CSRF and login cookies. Default: derived from dbqueue's
            signing key, so several dashboard processes accept each other's forms.
        debug: Starlette's debug mode (tracebacks in responses): for development only.

    Returns:
        A Starlette application serving the pages, their actions and `/metrics`.

    Raises:
        ModuleNotFoundError: (on `import dbqueue.web`) the `web` extra is not installed:
            `pip install 'dbqueue[web]'`.
    """
    dash = Dashboard(settings, token, secret)
    routes = [
        Route("/", dash.page(dash.overview), name="overview"),
        Route("/tasks", dash.page(dash.tasks), name="tasks"),
        Route("/tasks/{task_id:int}", dash.page(dash.task), name="task"),
        Route(
            "/tasks/{task_id:int}/{verb}",
            dash.action(dash.task_action),
            methods=["POST"],
            name="task_action",
        ),
        Route("/tasks/bulk/{verb}", dash.action(dash.bulk_action), methods=["POST"], name="bulk"),
        Route("/queues/{verb}", dash.action(dash.queue_action), methods=["POST"], name="queue"),
        Route("/workers", dash.page(dash.workers), name="workers"),
        Route("/counters", dash.page(dash.counters), name="counters"),
        Route("/bus", dash.page(dash.bus), name="bus"),
        Route("/metrics", dash.page(dash.metrics), name="metrics"),
        Route("/login", dash.login_form, name="login_form"),
        Route("/login", dash.login, methods=["POST"], name="login"),
    ]
    return Starlette(
        debug=debug,
        routes=routes,
        exception_handlers={
            HTTPException: dash.http_error,
            errors.DbqueueError: dash.database_error,
        },
    )
