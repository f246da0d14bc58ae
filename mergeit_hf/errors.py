"""Errors raised by mergeit-hf; each message names the problem and what to do about it."""


class MergeItError(Exception):
    """Base class of every error mergeit-hf raises on purpose."""


class ConfigError(MergeItError, ValueError):
    """A parameter is out of range or unknown."""


class InputError(MergeItError, ValueError):
    """The input data cannot be used as given (missing column, wrong type, unreadable file)."""


class TemplateError(MergeItError, ValueError):
    """A prompt or card template failed to load or render; the message names the file and line."""


class EndpointError(MergeItError, RuntimeError):
    """The LLM endpoint cannot be reached or keeps failing; the message names the URL, never the token."""


class EndpointConfigError(EndpointError):
    """The endpoint refuses the run as configured (wrong key, model name or URL: HTTP 401, 403, 404, or an
    ambiguous model list): the run stops once with the server's words, instead of failing every pair."""


class MalformedAnswerError(EndpointError):
    """The server answered (often HTTP 200) with something that is not the answer its dialect promises: an
    HTML page from a proxy, JSON cut in half, an error object, no choices. Transient, as a 5xx is: retried
    within ``request_retries``, then that one request fails with what came back."""


class QualityScoringError(MergeItError, RuntimeError):
    """Too many quality scores could not be computed from the endpoint's logprobs."""


class AnswerPending(Exception):
    """A batch round met a request whose answer is not in the request cache yet: the request is collected for
    the round's batch and the pair waits for the next round. Never a failure; never reaches the user."""
