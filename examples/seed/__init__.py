"""The five examples of the redishilok 1.1.0 README, run with celery_hilok."""
