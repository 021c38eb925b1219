"""The HTTP gateway: validates requests, queues jobs, serves status, progress and results."""
