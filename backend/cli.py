"""`rfclip-backend serve`: run the ML backend under gunicorn (or a threaded dev server).

Settings come from the environment (see README); a wrong value stops here, naming the variable.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import sys
from typing import Optional, Sequence

from rfclip_engine.cli import positive_int
from rfclip_engine.process import INTERRUPTED

from . import redaction
from .settings import Settings, SettingsError

# import name -> distribution, for the backend's own dependencies (the `backend` extra)
BACKEND_MODULES = {"flask": "Flask", "gunicorn": "gunicorn", "redis": "redis", "rq": "rq", "label_studio_sdk": "label-studio-sdk",
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
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the SDK's client: a line per API call


def serve(settings: Settings, host: str, port: int, workers: int, threads: int, timeout_s: int, dev: bool) -> None:
    from .app import create_app

    if workers > 1 and settings.prototypes and settings.redis_url is None:
        # a webhook reaches one process: the others would go on predicting without what it taught
        logging.getLogger("rfclip.backend").warning(
            "%d worker processes without REDIS_URL: each keeps its own prototypes, so a corrected annotation "
            "teaches only the process its webhook reached; set REDIS_URL to share them", workers)
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
    # string defaults go through `type` too, so a bad $WORKERS is refused by name, not with a traceback
    run.add_argument("--workers", type=positive_int, default=os.environ.get("WORKERS", "1"),
                     help="processes, each with its own model (default $WORKERS or 1)")
    run.add_argument("--threads", type=positive_int, default=os.environ.get("THREADS", "4"),
                     help="threads per process (default $THREADS or 4)")
    run.add_argument("--timeout", type=int, default=120, help="gunicorn worker timeout in seconds")
    run.add_argument("--dev", action="store_true", help="Flask's threaded development server instead of gunicorn")
    pre = sub.add_parser("preannotate", help="predict a whole project through the Label Studio API")
    pre.add_argument("--project", type=int, required=True, help="Label Studio project id")
    pre.add_argument("--tasks", default="unpredicted",
                     help="unpredicted (default: tasks with no prediction at all), all (every task without a "
                          "prediction of this model version), or ids like 1,2,5-9")
    pre.add_argument("--view", type=int, help="only the tasks of this Data Manager view (its filters)")
    pre.add_argument("--chunk", type=int, default=32, help="tasks predicted and pushed together (default 32)")
    where = pre.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="predict in this process (the default without REDIS_URL)")
    where.add_argument("--queue", action="store_true",
                       help="enqueue one job per chunk for `rfclip-backend worker` (the default with REDIS_URL)")
    pre.add_argument("--follow", action="store_true", help="with the queue: show progress until every chunk is done")
    pre.add_argument("--no-set-version", action="store_true",
                     help="leave the project's active model version alone (by default it is set to this "
                          "model's, so the Data Manager shows the prediction scores)")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    wrk = sub.add_parser("worker", help="run queued chunks with the model loaded once (several may share a GPU)")
    wrk.add_argument("--queue", help="queue name (default $RFCLIP_QUEUE or rfclip)")
    wrk.add_argument("--burst", action="store_true", help="quit when the queue is empty")
    learn = sub.add_parser("learn", help="build the project's visual prototypes from its existing annotations")
    learn.add_argument("--project", type=int, required=True, help="Label Studio project id")
    learn.add_argument("--no-progress", action="store_true", help="no progress bar")
    jobs = sub.add_parser("jobs", help="the state of the queued runs")
    jobs.add_argument("--project", type=int, help="only this project")
    jobs.add_argument("--json", action="store_true", help="as JSON (the same as GET /jobs)")
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
    if args.command in COMMANDS:
        return COMMANDS[args.command](settings, args)
    serve(settings, args.host, args.port, args.workers, args.threads, args.timeout, args.dev)
    return 0


def _fail(command: str, message: str, code: int = 2) -> int:
    print(f"rfclip-backend {command}: {message}", file=sys.stderr)
    return code


def _stopped(command: str, err: Exception) -> int:
    return _fail(command, f"stopped: {_error(err)}; what was pushed stays, and a rerun resumes", 1)


def _error(err: Exception) -> str:
    """One line about an error; for an HTTP error of the SDK, its status and body (not its headers),
    an HTML page's by its title: a proxy's or another server's error page, not Label Studio's API."""
    status, body = getattr(err, "status_code", None), getattr(err, "body", None)
    if isinstance(body, str) and body.lstrip()[:1] == "<":
        title = re.search(r"<title>([^<]{0,200})</title>", body, re.IGNORECASE)
        body = f"an HTML page{f' ({title[1].strip()})' if title else ''}, not an answer of Label Studio's API"
    text = f"HTTP {status}: {body}" if status is not None else str(err)
    return f"{type(err).__name__}: {redaction.one_line(redaction.redact(text))[:500]}"


def preannotate_command(settings: Settings, args: argparse.Namespace) -> int:
    """Exit status 0 when every selected task is predicted (or, with the queue, enqueued), 1 when
    some failed or the run was stopped (a rerun resumes), 2 on bad usage or a project the backend
    cannot predict."""
    from .jobs.studio import SelectionError, Studio, parse_selection
    from .label_config import LabelConfigError
    from .runtime import build_runtime

    if not (settings.label_studio_url and settings.label_studio_api_key):
        return _fail("preannotate", "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
    queued = args.queue or (settings.redis_url is not None and not args.local)
    try:
        ids = parse_selection(args.tasks)
        if args.chunk < 1:
            raise ValueError("--chunk must be at least 1")
        if queued and settings.redis_url is None:
            raise ValueError("--queue needs REDIS_URL (the Redis the workers listen on)")
        if args.follow and not queued:
            raise ValueError("--follow goes with the queue (REDIS_URL, or --queue)")
    except ValueError as err:
        return _fail("preannotate", str(err))
    runtime = build_runtime(settings)
    studio = Studio(settings.label_studio_url, settings.label_studio_api_key)
    mode = args.tasks if ids is None else "ids"
    try:
        if queued:
            return _enqueue(settings, args, runtime.service, studio, mode, ids)
        from .jobs.preannotate import preannotate
        from .media import Credentials

        # the model loads at the first chunk: a wrong project or view fails at once, without
        # waiting for a load it does not need
        credentials = Credentials(settings.label_studio_url, settings.label_studio_api_key)
        report = preannotate(runtime.service, studio, args.project, credentials, mode, ids, args.view, args.chunk,
                             progress=not args.no_progress, push_part=settings.push_part)
        version = runtime.service.version_for(args.project)  # the last chunk's: corrections may have moved it
        if not args.no_set_version and report.predicted:
            studio.set_model_version(args.project, version)
    except (LabelConfigError, SelectionError) as err:
        return _fail("preannotate", f"project {args.project}: {err}")
    except Exception as err:  # Label Studio down after the SDK's retries, a refused token, ...
        return _stopped("preannotate", err)
    except KeyboardInterrupt:  # a second Ctrl-C (a first stops after the chunk in flight), or one while enqueueing
        left = "the chunks queued go on in the workers, and a rerun queues the rest" if queued \
            else "what was pushed stays, and a rerun resumes"
        return _fail("preannotate", f"stopped at once: {left}", INTERRUPTED)
    _print_summary(args.project, report.predicted, report.skipped, report.left, version, report.failed)
    return 0 if not report.failed and not report.stopped else 1


def _enqueue(settings: Settings, args: argparse.Namespace, service, studio, mode: str, ids) -> int:
    from .jobs.preannotate import enqueue, follow
    from .jobs.queue import JobQueue

    queue = JobQueue.from_url(settings.redis_url, settings.queue_name, settings.job_timeout_s)
    version = service.version_for(args.project)
    report, enqueued = enqueue(service, studio, queue, args.project, mode, ids, args.view, args.chunk,
                               progress=not args.no_progress, set_version=not args.no_set_version)
    print(f"project {args.project}: {report.selected - report.skipped} tasks to predict in {len(enqueued.ids)} "
          f"chunks ({len(enqueued.added)} enqueued, {len(enqueued.pending)} already queued or running), "
          f"{report.skipped} skipped (already predicted); queue {settings.queue_name}, model version {version}")
    if enqueued.ids and not queue.workers():
        print(f"no worker listens on queue {settings.queue_name} yet: start one with rfclip-backend worker",
              file=sys.stderr)
    if not args.follow or not enqueued.ids:
        print("rfclip-backend jobs --project {0} shows the progress; rerun with --follow to watch it".format(
            args.project))
        return 0
    status = follow(queue, args.project, version, enqueued.ids, progress=not args.no_progress)
    tasks = status.tasks
    _print_summary(args.project, tasks["predicted"], tasks["skipped"], tasks["left"], version, status.failed_tasks,
                   tasks["failed"], status.failed_chunks)
    return 0 if status.finished and not tasks["failed"] and not status.failed_chunks else 1


def _print_summary(project: int, predicted: int, skipped: int, left: int, version: str, failed_tasks: dict,
                   failed: Optional[int] = None, failed_chunks: Optional[dict] = None) -> None:
    """The closing lines of a run; `failed` counts the failed tasks when `failed_tasks` lists only some."""
    print(f"project {project}: {predicted} predicted, {skipped} skipped (already predicted), "
          f"{len(failed_tasks) if failed is None else failed} failed, {left} left; model version {version}")
    _print_failures(failed_tasks, failed_chunks or {})


def _print_failures(failed_tasks: dict, failed_chunks: dict) -> None:
    for task, reason in sorted(failed_tasks.items(), key=lambda item: int(item[0])):
        print(f"  task {task}: {reason}")
    for job_id, error in failed_chunks.items():
        print(f"  chunk {job_id} failed: {error}")


def worker_command(settings: Settings, args: argparse.Namespace) -> int:
    from .jobs.queue import JobQueue
    from .jobs.studio import Studio
    from .jobs.worker import work
    from .media import Credentials
    from .runtime import build_runtime

    if settings.redis_url is None:
        return _fail("worker", "set REDIS_URL (the Redis the chunks are queued on)")
    if not (settings.label_studio_url and settings.label_studio_api_key):
        return _fail("worker", "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (the worker pushes the predictions)")
    runtime = build_runtime(settings)
    runtime.holder.start()  # the model loads while the worker registers
    queue = JobQueue.from_url(settings.redis_url, args.queue or settings.queue_name, settings.job_timeout_s)
    studio = Studio(settings.label_studio_url, settings.label_studio_api_key)
    credentials = Credentials(settings.label_studio_url, settings.label_studio_api_key)
    try:
        work(runtime.service, studio, credentials, queue, settings.job_lease_s, burst=args.burst,
             logging_level=settings.log_level, push_part=settings.push_part)
    except Exception as err:  # Redis unreachable at start, ...
        return _fail("worker", _error(err), 1)
    return 0


def learn_command(settings: Settings, args: argparse.Namespace) -> int:
    """Exit status 0 when every annotation was read, 1 when some failed or the run stopped, 2 on
    bad usage or a project the backend cannot predict."""
    from .jobs.studio import SelectionError, Studio
    from .label_config import LabelConfigError
    from .learning.learner import Learner
    from .learning.project import learn_project
    from .media import Credentials
    from .runtime import build_runtime

    if not (settings.label_studio_url and settings.label_studio_api_key):
        return _fail("learn", "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
    if not settings.prototypes:
        return _fail("learn", "prototypes are off (RFCLIP_PROTOTYPES=off)")
    if settings.redis_url is None:
        return _fail("learn", "set REDIS_URL: without it a backend keeps what it learns in its own process, "
                              "so nothing learned here would reach it")
    runtime = build_runtime(settings)
    runtime.holder.start()
    credentials = Credentials(settings.label_studio_url, settings.label_studio_api_key)
    learner = Learner(runtime.service, lambda project: credentials)
    try:
        report = learn_project(learner, Studio(settings.label_studio_url, settings.label_studio_api_key),
                               args.project, progress=not args.no_progress)
        counts = runtime.service.bank.counts(args.project)
    except (LabelConfigError, SelectionError) as err:
        return _fail("learn", f"project {args.project}: {err}")
    except Exception as err:  # Label Studio or Redis down after the retries, a refused token, ...
        return _fail("learn", f"stopped: {_error(err)}; a rerun learns everything again", 1)
    except KeyboardInterrupt:  # a second Ctrl-C (the first stops after the annotation in flight)
        return _fail("learn", "stopped at once; a rerun learns everything again", INTERRUPTED)
    labels = ", ".join(f"{label} {n}" for (_, label), n in sorted(counts.items())) or "none"
    print(f"project {args.project}: {report.annotations} annotations, {report.learned} learned, {report.empty} with "
          f"no predicted label, {len(report.failed)} failed, {report.forgotten} forgotten (no longer in the "
          f"project); examples per label: {labels}; model version {runtime.service.version_for(args.project)}")
    for annotation, reason in sorted(report.failed.items()):
        print(f"  annotation {annotation}: {reason}")
    return 0 if not report.failed and not report.stopped else 1


def jobs_command(settings: Settings, args: argparse.Namespace) -> int:
    from .jobs.queue import JobQueue

    if settings.redis_url is None:
        return _fail("jobs", "set REDIS_URL (the Redis the chunks are queued on)")
    queue = JobQueue.from_url(settings.redis_url, settings.queue_name)
    try:
        runs = queue.status(args.project)
        workers = queue.workers()
    except Exception as err:
        return _fail("jobs", _error(err), 1)
    if args.json:
        print(json.dumps({"queue": settings.queue_name, "workers": workers, "runs": [r.to_json() for r in runs]}))
        return 0
    print(f"queue {settings.queue_name}: {workers} workers")
    for run in runs:
        chunks, tasks = run.chunks, run.tasks
        eta = "" if run.eta_s is None or run.finished else f", ETA {_duration(run.eta_s)}"
        print(f"project {run.project} {run.model_version}: chunks {chunks['queued']} queued, {chunks['running']} "
              f"running, {chunks['done']} done, {chunks['failed']} failed; tasks {tasks['predicted']} predicted, "
              f"{tasks['skipped']} skipped, {tasks['failed']} failed, {tasks['left']} left of {tasks['total']}{eta}")
        for worker, rate in run.tasks_per_s.items():
            print(f"  worker {worker}: {rate:.2f} tasks/s")
        _print_failures(run.failed_tasks, run.failed_chunks)
    return 0


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


COMMANDS = {"preannotate": preannotate_command, "worker": worker_command, "learn": learn_command,
            "jobs": jobs_command}


if __name__ == "__main__":
    sys.exit(main())
