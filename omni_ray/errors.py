"""One exception hierarchy for omni-ray.

Every error carries the HTTP status and the OpenAI error ``type`` that the ingress
answers with, so that mapping an exception to a response is one lookup::

    OmniError                      500 internal_error
    ├── ConfigError                500 config_error
    ├── InvalidRequestError        400 invalid_request_error
    │   └── ModelNotFoundError     404 not_found_error
    ├── AuthenticationError        401 authentication_error
    ├── SchedulerError             503 scheduler_error
    │   └── QueueFullError         429 rate_limit_error   (carries retry_after seconds)
    ├── RequestCancelledError      499 cancelled
    ├── RequestTimeoutError        504 timeout_error
    └── ProcessingError            500 processing_error   (engine-side failures; vLLM-omni's name)
        ├── CacheError             500 cache_error
        ├── ResourceError          503 resource_error
        └── EngineError            503 engine_error
            └── StageUnavailableError  503 engine_error, code stage_unavailable (carries stage, retry_after)

4xx errors other than 499 are the client's (``is_client_error``): logged on one line and counted
apart from failures, in the stage replicas, the ingress, the metrics and the scheduler.
"""

from __future__ import annotations


class OmniError(Exception):
    http_status: int = 500
    error_type: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_openai(self) -> dict:
        """The OpenAI-style error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}

    def __reduce__(self):  # survive Ray / pickle round trips with keyword fields
        return (_rebuild, (type(self), self.message, self.param, self.code, self.__dict__))


def _rebuild(cls, message, param, code, state):
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class ConfigError(OmniError):
    error_type = "config_error"


class InvalidRequestError(OmniError):
    http_status = 400
    error_type = "invalid_request_error"


class ModelNotFoundError(InvalidRequestError):
    http_status = 404
    error_type = "not_found_error"


class AuthenticationError(OmniError):
    http_status = 401
    error_type = "authentication_error"


class SchedulerError(OmniError):
    http_status = 503
    error_type = "scheduler_error"


class QueueFullError(SchedulerError):
    http_status = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kw):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class RequestCancelledError(OmniError):
    http_status = 499
    error_type = "cancelled"


class RequestTimeoutError(OmniError):
    http_status = 504
    error_type = "timeout_error"


class ProcessingError(OmniError):
    """The base of failures on the engine side (not the caller's fault): ``except ProcessingError``
    catches an engine step that failed, a cache that failed, resources that ran out."""

    error_type = "processing_error"


class CacheError(ProcessingError):
    error_type = "cache_error"


class ResourceError(ProcessingError):
    http_status = 503
    error_type = "resource_error"


class EngineError(ProcessingError):
    http_status = 503
    error_type = "engine_error"


class StageUnavailableError(EngineError):
    """A stage has no healthy replica (e.g. one is being replaced after a crash) and none came back
    within the wait bound: 503 with ``Retry-After``."""

    def __init__(self, message: str, *, stage: str, retry_after: float = 1.0, **kw):
        kw.setdefault("code", "stage_unavailable")
        super().__init__(message, **kw)
        self.stage = stage
        self.retry_after = retry_after


def is_client_error(err: BaseException | None) -> bool:
    """A 4xx (the caller's fault) but for 499 (cancelled): bad input, unknown model, auth, a full queue."""
    return isinstance(err, OmniError) and 400 <= err.http_status < 500 and err.http_status != 499
