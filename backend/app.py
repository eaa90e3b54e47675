"""The Flask app (an app factory) speaking Label Studio's ML-backend protocol.

Endpoints: GET /health (no auth; a short state, answered at once, even while the model loads),
GET /status (details: load errors, settings with secrets masked), POST /setup, POST /predict,
POST /webhook, GET /versions, GET /jobs (the job queue's runs, as `rfclip-backend jobs --json`).
Request bodies, headers and tokens are never logged.
"""
from __future__ import annotations

import hmac
import json
import logging
import threading
from collections import OrderedDict
from typing import Optional

from flask import Flask, Response, jsonify, request
from redis.exceptions import RedisError
from werkzeug.exceptions import BadRequest, HTTPException

from rfclip_engine.loading import resolve_device

from .jobs.overflow import Overflow
from .jobs.queue import JobQueue
from .label_config import LabelConfigError
from .learning.learner import Learner, webhook_events
from .media import Credentials
from .runtime import SegmenterLoader, build_runtime, load_segmenter
from .settings import Settings

log = logging.getLogger("rfclip.backend")


class ProjectStore:
    """Per-project label config and the credentials /setup brought (used only when the
    environment sets neither LABEL_STUDIO_URL nor LABEL_STUDIO_API_KEY); the `capacity` most
    recently used projects are kept, so a stream of /setup calls cannot grow the memory."""

    def __init__(self, capacity: int = 1000) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._configs: "OrderedDict[str, str]" = OrderedDict()
        self._credentials: "OrderedDict[str, Credentials]" = OrderedDict()

    @staticmethod
    def key(project: object) -> str:
        return str(project or "").split(".", 1)[0][:64]  # LS sends "<id>.<timestamp>"

    def __len__(self) -> int:
        return len(self._configs.keys() | self._credentials.keys())

    def remember(self, project: object, label_config: Optional[str], credentials: Optional[Credentials]) -> None:
        key = self.key(project)
        with self._lock:
            for store, value in ((self._configs, label_config), (self._credentials, credentials)):
                if value:
                    store[key] = value
                    store.move_to_end(key)
                    while len(store) > self.capacity:
                        store.popitem(last=False)

    def config(self, project: object) -> Optional[str]:
        with self._lock:
            return self._configs.get(self.key(project))

    def credentials(self, project: object) -> Credentials:
        with self._lock:
            return self._credentials.get(self.key(project), Credentials(None, None))


def create_app(settings: Optional[Settings] = None, segmenter_loader: SegmenterLoader = load_segmenter) -> Flask:
    settings = settings or Settings.from_env()
    runtime = build_runtime(settings, segmenter_loader)
    text_cache, holder, service = runtime.text_cache, runtime.holder, runtime.service
    projects = ProjectStore(settings.max_projects)
    # no long retries here: a Redis that is down must not hold up /predict past its budget
    queue = JobQueue.from_url(settings.redis_url, settings.queue_name, settings.job_timeout_s, retries=1) \
        if settings.redis_url else None
    # the workers push with their own LABEL_STUDIO_URL: only a backend configured with one (so
    # that both mean the same server) hands them tasks
    overflow = Overflow(queue, service.version_for) if queue is not None and settings.label_studio_url else None


    def credentials_for(project: object) -> Credentials:
        # The environment's key goes only to the environment's URL; /setup's pair only as a pair.
        if settings.label_studio_url or settings.label_studio_api_key:
            return Credentials(settings.label_studio_url, settings.label_studio_api_key)
        return projects.credentials(project)

    learner = Learner(service, credentials_for) if service.bank is not None else None

    app = Flask("rfclip_backend")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.extensions["rfclip"] = {"service": service, "holder": holder, "text_cache": text_cache, "projects": projects,
                                "overflow": overflow, "learner": learner}

    @app.before_request
    def authenticate_and_warm_up() -> Optional[Response]:
        holder.start()  # first request of this (forked) process starts loading the model
        if request.path == "/health" or settings.basic_auth is None:
            return None
        if not _authorized(request.authorization, settings.basic_auth):
            return Response('{"error": "authentication required"}', 401, mimetype="application/json",
                            headers={"WWW-Authenticate": 'Basic realm="rfclip"'})
        return None

    @app.get("/")
    @app.get("/health")
    def health():
        # Unauthenticated: a short state only, and nothing that waits on the model or on Redis.
        return jsonify(status="UP", model_class="RFCLIP", model_version=service.model_version,
                       model={"name": settings.model, "state": holder.state},
                       device=str(resolve_device(settings.device)), redis=text_cache.state)

    @app.get("/status")
    def status():
        return jsonify(model_version=service.model_version,
                       model={"name": settings.model, "state": holder.state, "error": holder.error},
                       device=str(resolve_device(settings.device)), redis=text_cache.ping(),
                       settings=settings.describe())

    @app.post("/setup")
    def setup():
        body = _json_body()
        project = body.get("project")
        schema = _text_field(body, "schema")
        try:
            service.warm_up(schema)  # a config the backend cannot use is refused before anything is kept
        except LabelConfigError as err:
            log.error("project %s: %s", projects.key(project), err)
            return jsonify(error=str(err)), 400
        projects.remember(project, schema, Credentials(_text_field(body, "hostname") or None,
                                                       _text_field(body, "access_token") or None))
        return jsonify(model_version=service.version_for(_project_id(projects.key(project))))

    @app.post("/predict")
    def predict():
        body = _json_body()
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            return jsonify(error="the body needs a 'tasks' list"), 400
        project = body.get("project")
        label_config = _text_field(body, "label_config") or projects.config(project)
        try:
            service.targets(label_config or "")
        except LabelConfigError as err:
            log.error("project %s: %s", projects.key(project), err)
            return jsonify(error=str(err)), 400
        project_id = _project_id(projects.key(project))
        outcome = service.predict(tasks, label_config, credentials_for(project), project_id)
        if overflow is not None and outcome.unreached:
            overflow.submit(project_id, tasks, outcome.unreached)
        return jsonify(results=outcome.entries, model_version=service.version_for(project_id))

    @app.post("/webhook")
    def webhook():
        body = _json_body()
        action = body.get("action")
        if action == "PROJECT_UPDATED":
            project = body.get("project") or {}
            if not isinstance(project, dict):
                raise BadRequest("'project' must be a JSON object")
            label_config = _text_field(project, "label_config")
            try:
                if label_config:
                    service.warm_up(label_config)
            except LabelConfigError as err:
                log.error("project %s: %s", projects.key(project.get("id")), err)
                return jsonify(error=str(err)), 400
            projects.remember(project.get("id"), label_config, None)
            log.info("project %s: label config refreshed", projects.key(project.get("id")))
            return jsonify(status="ok")
        try:
            events = webhook_events(body, projects.config)
        except ValueError as err:
            log.error("webhook not used: %s", err)
            return jsonify(error=str(err)), 400
        if not events:
            return jsonify(status="ignored", action=action if isinstance(action, str) else None)
        if learner is None:
            return jsonify(status="ignored", action=action, reason="prototypes are off (RFCLIP_PROTOTYPES)")
        dropped = learner.submit(events)
        return jsonify(status="queued", events=len(events) - dropped, dropped=dropped)

    @app.get("/jobs")
    def jobs():
        if queue is None:
            return jsonify(error="no job queue: set REDIS_URL"), 404
        project = request.args.get("project")
        if project is not None and _project_id(project) is None:
            raise BadRequest("'project' must be a project id")
        try:
            runs = queue.status(_project_id(project) if project is not None else None)
            workers = queue.workers()
        except RedisError as err:
            return jsonify(error=f"the job queue's Redis is unreachable: {type(err).__name__}"), 503
        return jsonify(queue=queue.queue.name, workers=workers, runs=[r.to_json() for r in runs])

    @app.get("/versions")
    def versions():
        return jsonify(versions=[service.model_version])

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException):
        return jsonify(error=err.description), err.code

    @app.errorhandler(Exception)
    def unexpected(err: Exception):
        log.exception("unexpected error on %s %s", request.method, request.path)
        return jsonify(error=f"internal error: {type(err).__name__}"), 500

    return app


def _authorized(auth, expected: Optional[tuple]) -> bool:
    if expected is None:
        return True
    if auth is None or auth.type != "basic":
        return False
    user, password = (value.encode("utf-8", "surrogateescape") for value in expected)
    given_user, given_password = ((value or "").encode("utf-8", "surrogateescape")
                                  for value in (auth.username, auth.password))
    # both compared, always: the time taken says nothing about which one was wrong
    return hmac.compare_digest(given_user, user) & hmac.compare_digest(given_password, password)


def _project_id(raw: str) -> Optional[int]:
    return int(raw) if raw.isdigit() and len(raw) < 19 else None


def _json_body() -> dict:
    try:
        body = json.loads(request.get_data(cache=True) or b"null")
    except RecursionError:
        raise BadRequest("the body is nested too deeply") from None
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _text_field(body: dict, name: str) -> str:
    """A string field of a request body ("" when absent); 400 when it holds anything else."""
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"'{name}' must be a string, not {type(value).__name__}")
    return value
