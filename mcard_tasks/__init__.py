"""mcard-tasks: exactly-once minting and burning of digital cards with Celery over RabbitMQ."""

from mcard_tasks.application import app

__all__ = ["app"]
