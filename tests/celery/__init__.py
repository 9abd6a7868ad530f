"""Tests of the Celery integration (real redis-server, real Celery workers)."""
