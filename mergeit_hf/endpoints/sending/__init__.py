"""Sending requests: the scheduler (concurrency bound, identical requests once), the on-disk request cache,
and running the async code from sync callers."""
