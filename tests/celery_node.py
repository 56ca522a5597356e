"""Airflow's `[core] hostname_callable` for the Celery workers that tests/test_celery_deployment.py
starts on one machine. In docker-compose.yaml each worker container has its own hostname, which is
what Airflow records on the task instances it runs; natively both workers share the machine's, so
each records instead the name of the Celery worker that received the task, as Celery knows it."""

from __future__ import annotations

import socket


def hostname() -> str:
    from celery import current_task

    node = current_task.request.hostname if current_task else None  # "celery@worker-a"
    return node.split("@", 1)[1] if node else socket.getfqdn()  # outside a task: the machine's
