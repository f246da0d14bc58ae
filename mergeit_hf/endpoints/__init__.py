"""The servers stage 2 talks to: what every backend gives (``base``), how one is opened (``connect``, after
``probe``) and asked for structured output; one module per kind of server in ``servers/``; the HTTP
behaviour they share in ``http/``; and sending (``sending/``: the scheduler, the request cache, sync calls)."""
