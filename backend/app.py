"""The Flask app (an app factory) speaking Label Studio's ML-backend protocol.

Endpoints: GET /health (no auth; answers at once, even while the model loads), POST /setup,
POST /predict, POST /webhook, GET /versions. Request bodies, headers and tokens are never logged.
"""
from __future__ import annotations

import hmac
import logging
import threading
from typing import Callable, Dict, Optional

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import BadRequest, HTTPException

from rfclip_engine import Segmenter, load_model
from rfclip_engine.loading import resolve_device
from rfclip_engine.text import EmbeddingCache

from .label_config import LabelConfigError
from .media import Credentials, ImageFetcher
from .service import ModelHolder, PredictionService, segmenter_config
from .settings import Settings
from .text_cache import RedisEmbeddingCache

log = logging.getLogger("rfclip.backend")
SegmenterLoader = Callable[[Settings, EmbeddingCache], Segmenter]


def load_segmenter(settings: Settings, text_cache: EmbeddingCache) -> Segmenter:
    device = resolve_device(settings.device)
    model = load_model(settings.model, pretrained=settings.pretrained, device=device,
                       distraction_dims=settings.distraction_dims, weights_tag=settings.weights_tag)
    return Segmenter(model, segmenter_config(settings, device), text_cache=text_cache,
                     max_pixels=settings.max_image_pixels)


class ProjectStore:
    """Per-project label config and the credentials /setup brought (fallbacks for the env's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._configs: Dict[str, str] = {}
        self._credentials: Dict[str, Credentials] = {}

    @staticmethod
    def key(project: object) -> str:
        return str(project or "").split(".", 1)[0]  # LS sends "<id>.<timestamp>"

    def remember(self, project: object, label_config: Optional[str], credentials: Optional[Credentials]) -> None:
        with self._lock:
            if label_config:
                self._configs[self.key(project)] = label_config
            if credentials:
                self._credentials[self.key(project)] = credentials

    def config(self, project: object) -> Optional[str]:
        return self._configs.get(self.key(project))

    def credentials(self, project: object) -> Credentials:
        return self._credentials.get(self.key(project), Credentials(None, None))


def create_app(settings: Optional[Settings] = None, segmenter_loader: SegmenterLoader = load_segmenter) -> Flask:
    settings = settings or Settings.from_env()
    text_cache = RedisEmbeddingCache(settings.redis_url)
    holder = ModelHolder(lambda: segmenter_loader(settings, text_cache))
    fetcher = ImageFetcher(settings.cache_dir, settings.allowed_local_dir, settings.max_download_bytes,
                           settings.fetch_timeout_s, settings.max_image_pixels, settings.image_cache_mb << 20)
    service = PredictionService(settings, holder, fetcher)
    projects = ProjectStore()

    app = Flask("rfclip_backend")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.extensions["rfclip"] = {"service": service, "holder": holder, "text_cache": text_cache, "projects": projects}

    def credentials_for(project: object) -> Credentials:
        fallback = projects.credentials(project)
        return Credentials(settings.label_studio_url or fallback.url, settings.label_studio_api_key or fallback.token)

    @app.before_request
    def authenticate_and_warm_up() -> Optional[Response]:
        holder.start()  # first request of this (forked) process starts loading the model
        if request.path == "/health" or settings.basic_auth is None:
            return None
        auth = request.authorization
        user, password = settings.basic_auth
        if auth is None or auth.type != "basic" or not (
                hmac.compare_digest(auth.username or "", user) and hmac.compare_digest(auth.password or "", password)):
            return Response('{"error": "authentication required"}', 401, mimetype="application/json",
                            headers={"WWW-Authenticate": 'Basic realm="rfclip"'})
        return None

    @app.get("/")
    @app.get("/health")
    def health():
        return jsonify(status="UP", model_class="RFCLIP", model_version=service.model_version,
                       model={"name": settings.model, "state": holder.state, "error": holder.error},
                       device=str(resolve_device(settings.device)), redis=text_cache.ping())

    @app.post("/setup")
    def setup():
        body = _json_body()
        schema = body.get("schema") or ""
        projects.remember(body.get("project"), schema,
                          Credentials(body.get("hostname") or None, body.get("access_token") or None))
        try:
            service.warm_up(schema)
        except LabelConfigError as err:
            log.error("project %s: %s", projects.key(body.get("project")), err)
            return jsonify(error=str(err)), 400
        return jsonify(model_version=service.model_version)

    @app.post("/predict")
    def predict():
        body = _json_body()
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            return jsonify(error="the body needs a 'tasks' list"), 400
        project = body.get("project")
        label_config = body.get("label_config") or projects.config(project)
        try:
            service.targets(label_config or "")
        except LabelConfigError as err:
            log.error("project %s: %s", projects.key(project), err)
            return jsonify(error=str(err)), 400
        results = service.predict(tasks, label_config, credentials_for(project))
        return jsonify(results=results, model_version=service.model_version)

    @app.post("/webhook")
    def webhook():
        body = _json_body()
        action = body.get("action")
        if action == "PROJECT_UPDATED":
            project = body.get("project") or {}
            projects.remember(project.get("id"), project.get("label_config"), None)
            log.info("project %s: label config refreshed", project.get("id"))
            try:
                if project.get("label_config"):
                    service.warm_up(project["label_config"])
            except LabelConfigError as err:
                log.error("project %s: %s", project.get("id"), err)
            return jsonify(status="ok")
        return jsonify(status="ignored", action=action)

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


def _json_body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body
