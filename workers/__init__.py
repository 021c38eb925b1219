"""GPU workers: the Celery app, the job task, and the Redis state every process shares.

Nothing here imports torch at import time: the gateway imports the store and the Celery app too.
"""
