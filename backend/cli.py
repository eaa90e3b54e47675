"""`rfclip-backend serve`: run the ML backend under gunicorn (or a threaded dev server).

Settings come from the environment (see README); a wrong value stops here, naming the variable.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from typing import Optional, Sequence

from . import redaction
from .settings import Settings, SettingsError

# import name -> distribution, for the backend's own dependencies (the `backend` extra)
BACKEND_MODULES = {"flask": "Flask", "gunicorn": "gunicorn", "redis": "redis", "label_studio_sdk": "label-studio-sdk",
                   "defusedxml": "defusedxml", "requests": "requests"}


def missing_backend_modules() -> list:
    missing = []
    for module, distribution in BACKEND_MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(distribution)
    return missing


def configure_logging(level: str) -> None:
    redaction.install(level)
    # The SDK warns about "localhost" on every download and logs URLs at INFO; our own lines say
    # what matters, once per task.
    logging.getLogger("label_studio_sdk").setLevel(logging.ERROR)
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def serve(settings: Settings, host: str, port: int, workers: int, threads: int, timeout_s: int, dev: bool) -> None:
    from .app import create_app

    if dev:
        create_app(settings).run(host=host, port=port, threaded=True)
        return
    from gunicorn.app.base import BaseApplication

    class Server(BaseApplication):
        def load_config(self) -> None:
            self.cfg.set("bind", f"{host}:{port}")
            self.cfg.set("workers", workers)
            self.cfg.set("threads", threads)
            self.cfg.set("timeout", timeout_s)
            self.cfg.set("preload_app", False)  # each worker builds its app and loads the model after fork
            self.cfg.set("accesslog", None)

        def load(self):
            configure_logging(settings.log_level)  # gunicorn set up its own handlers by now
            return create_app(settings)

    Server().run()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="rfclip-backend", description="RF-CLIP ML backend for Label Studio")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve", help="serve the backend")
    run.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 in Docker)")
    run.add_argument("--port", type=int, default=9090)
    run.add_argument("--workers", type=int, default=int(os.environ.get("WORKERS", 1)),
                     help="processes, each with its own model (default $WORKERS or 1)")
    run.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", 4)),
                     help="threads per process (default $THREADS or 4)")
    run.add_argument("--timeout", type=int, default=120, help="gunicorn worker timeout in seconds")
    run.add_argument("--dev", action="store_true", help="Flask's threaded development server instead of gunicorn")
    pre = sub.add_parser("preannotate", help="predict a whole project through the Label Studio API, in this process")
    pre.add_argument("--project", type=int, required=True, help="Label Studio project id")
    pre.add_argument("--tasks", default="unpredicted",
                     help="unpredicted (default: tasks with no prediction at all), all (every task without a "
                          "prediction of this model version), or ids like 1,2,5-9")
    pre.add_argument("--view", type=int, help="only the tasks of this Data Manager view (its filters)")
    pre.add_argument("--chunk", type=int, default=32, help="tasks predicted and pushed together (default 32)")
    pre.add_argument("--no-set-version", action="store_true",
                     help="leave the project's active model version alone (by default it is set to this "
                          "model's, so the Data Manager shows the prediction scores)")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    missing = missing_backend_modules()
    if missing:
        print(f"rfclip-backend: the backend's dependencies are not installed ({', '.join(missing)}); "
              "install them with: pip install 'rfclip[backend]'", file=sys.stderr)
        return 2
    try:
        settings = Settings.from_env()
    except SettingsError as err:
        print(f"rfclip-backend: bad setting: {err}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    logging.getLogger("rfclip.backend").info("settings: %s", settings.describe())
    if args.command == "preannotate":
        return preannotate_command(settings, args)
    serve(settings, args.host, args.port, args.workers, args.threads, args.timeout, args.dev)
    return 0


def preannotate_command(settings: Settings, args: argparse.Namespace) -> int:
    """Exit status 0 when every selected task is predicted, 1 when some failed or the run was
    stopped (a rerun resumes), 2 on bad usage or a project the backend cannot predict."""
    from .jobs.preannotate import preannotate
    from .jobs.studio import Studio, parse_selection
    from .label_config import LabelConfigError
    from .media import Credentials
    from .runtime import build_runtime

    if not (settings.label_studio_url and settings.label_studio_api_key):
        print("rfclip-backend preannotate: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY", file=sys.stderr)
        return 2
    try:
        ids = parse_selection(args.tasks)
        if args.chunk < 1:
            raise ValueError("--chunk must be at least 1")
    except ValueError as err:
        print(f"rfclip-backend preannotate: {err}", file=sys.stderr)
        return 2
    runtime = build_runtime(settings)
    runtime.holder.start()
    studio = Studio(settings.label_studio_url, settings.label_studio_api_key)
    credentials = Credentials(settings.label_studio_url, settings.label_studio_api_key)
    mode = args.tasks if ids is None else "ids"
    try:
        report = preannotate(runtime.service, studio, args.project, credentials, mode, ids, args.view, args.chunk,
                             progress=not args.no_progress)
        if not args.no_set_version and report.predicted:
            studio.set_model_version(args.project, runtime.service.model_version)
    except LabelConfigError as err:
        print(f"rfclip-backend preannotate: project {args.project}: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # Label Studio down after the SDK's retries, a refused token, ...
        print(f"rfclip-backend preannotate: stopped: {type(err).__name__}: {redaction.redact(str(err))[:500]}; "
              "what was pushed stays, and a rerun resumes", file=sys.stderr)
        return 1
    print(f"project {args.project}: {report.predicted} predicted, {report.skipped} skipped (already predicted), "
          f"{len(report.failed)} failed, {report.left} left; model version {runtime.service.model_version}")
    for task, reason in sorted(report.failed.items()):
        print(f"  task {task}: {reason}")
    return 0 if not report.failed and not report.stopped else 1


if __name__ == "__main__":
    sys.exit(main())
