"""Stage 2 through OpenAI-compatible batch APIs (``/v1/files`` + ``/v1/batches``): requests collected in
rounds, sent as JSON lines files, answers written into the request cache."""
