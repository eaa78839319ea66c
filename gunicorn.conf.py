"""gunicorn settings. Binds explicitly: honcho sets PORT for every process, and
gunicorn would otherwise bind 0.0.0.0:$PORT."""

import os

from webapp.config import log_format

bind = [f"127.0.0.1:{os.environ.get('WEB_PORT', '8000')}"]
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("WEB_THREADS", "4"))
worker_class = "gthread"
timeout = 60
graceful_timeout = 20
accesslog = "-"
errorlog = "-"
# The access log line carries the path and query: the redacting formatter
# removes code, state and token values (OAuth callback query strings), in the
# app's LOG_FORMAT. gunicorn merges this into its defaults, which give the root
# logger a handler of their own: the app's records would then be written twice,
# once unformatted. The root is left to the app (webapp.logs.configure_logging).
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "root": {"level": "INFO", "handlers": []},
    "formatters": {"mailkey": {"()": "webapp.logs.make_formatter", "fmt": log_format(os.environ)}},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "mailkey"},
    },
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["console"], "propagate": False},
        "gunicorn.access": {"level": "INFO", "handlers": ["console"], "propagate": False},
    },
}


def child_exit(server, worker):  # noqa: ARG001
    """Multiprocess metrics: forget a dead worker's live gauges."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
