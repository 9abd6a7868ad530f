"""``python -m celery_hilok``: the ``hilok`` command outside of Celery."""

from .cli import main

main()
