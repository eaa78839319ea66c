"""Static Celery settings. Broker, result backend and RedBeat URLs come from the
Flask settings (REDIS_URL) in webapp.worker.celery_init_app, and so does the
beat schedule, whose intervals are configurable."""

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]
timezone = "UTC"
enable_utc = True

# A task runs to the end at least once: acknowledged after it finishes, put back
# when its worker dies. Tasks are idempotent, so a second run changes nothing.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1

# Time limits sit far below the visibility timeout, so a slow task is never
# handed to a second worker while the first still runs it.
task_soft_time_limit = 300
task_time_limit = 360
broker_transport_options = {"visibility_timeout": 3600}
result_backend_transport_options = {"visibility_timeout": 3600}
result_expires = 86400

# Flower shows task states and retries only with events on.
worker_send_task_events = True
task_send_sent_event = True

worker_hijack_root_logger = False
broker_connection_retry_on_startup = True

beat_scheduler = "redbeat.RedBeatScheduler"
beat_max_loop_interval = 10
# A beat restarted after a crash takes the lock over within a minute, not 25.
redbeat_lock_timeout = 60
redbeat_key_prefix = "mailkey:redbeat"

imports = ("tasks.refresh", "tasks.sync")
