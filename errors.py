"""Every failure epserve means to report: one family, each class mapped once to an HTTP answer and
once to a CLI line.

    EpserveError                       500 server_error            exit 1
      RequestError (ValueError)        400 invalid_request_error   exit 2   the request / command line is bad
        InvalidRequest                 400   a parameter is out of range (`param` names it)
          ContextTooLong               400   code context_length_exceeded: prompt + max_tokens > the context
          RequestTooLarge              400   the request can never fit a rank's KV pool
          RequestRejected              400   a rank refused it for a reason no subclass names
          GrammarError                 400   a structured-output grammar does not compile
        PayloadTooLarge                413   code request_too_large: body bytes, message count
        AuthenticationError            401   code invalid_api_key
        ModelNotFound                  404   code model_not_found
        ClientClosed                   499   the client left before its admission ended
      Overloaded (RuntimeError)        429 rate_limit_error        exit 6   full now; Retry-After says when
        KVCacheFull, TenantRateLimited
      ConfigError (ValueError)         500 server_error            exit 3   a config key, config.json or checkpoint
        CheckpointError
      Unavailable (RuntimeError)       503 server_error            exit 4   nothing can serve it now; retry
        NoRankAvailable, BackendUnavailable, DeepEPUnavailable
      UnitFailure (RuntimeError)       500 server_error            exit 5   a unit or rank failed the work
        UnitStartFailed 503, PlacementFailed 503, UnitLost 503, DeviceAssignmentError, HandoffFailed, UnitFailed

Contract: a class carries its HTTP `status`, OpenAI error `type` and `code`, and its CLI `exit_code`
as class attributes; an instance adds its message, `param` (the request field to blame), and
`retry_after` (seconds, sent as Retry-After), and may override `code`. The builtin base of a
family (ValueError, RuntimeError) stays, so callers catching the builtin keep working.
Every instance pickles with all its fields whatever its __init__ takes (`__reduce__`): Ray carries
these errors between processes as values or as a task's cause, and the receiver sorts them by
class, never by parsing text. `http_error` renders OpenAI's body, `cli_error` the CLI line.
Never: imports anything from epserve (this is the ground floor), or reads a clock, a file or Ray.
"""
from __future__ import annotations


def _rebuild(cls, args: tuple, state: dict):
    """Unpickle without calling __init__ (subclasses take different arguments)."""
    exc = cls.__new__(cls, *args)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class EpserveError(Exception):
    """Base of every error epserve raises on purpose. Unlisted subclasses answer 500 / exit 1."""

    status = 500
    type = "server_error"
    code: str | None = None
    exit_code = 1

    def __init__(self, message: str, param: str | None = None, *, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.message, self.param, self.retry_after = message, param, retry_after
        if code is not None:
            self.code = code             # this instance's code; the class's otherwise

    def __reduce__(self):
        return _rebuild, (type(self), self.args, dict(self.__dict__))

    def __str__(self) -> str:
        return self.message

    @property
    def headers(self) -> dict:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}

    def body(self) -> dict:
        """OpenAI's error body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- the request is bad (4xx) -------------------------------------------------------------------
class RequestError(EpserveError, ValueError):
    status, type, exit_code = 400, "invalid_request_error", 2


class InvalidRequest(RequestError):
    """A request parameter is out of range; `param` names it."""


class ContextTooLong(InvalidRequest):
    """The prompt (with max_tokens, when given) does not fit the model's context."""

    code = "context_length_exceeded"

    def __init__(self, n_prompt: int, max_tokens: int | None, max_len: int, param: str = "prompt"):
        self.n_prompt, self.max_tokens, self.max_len = n_prompt, max_tokens, max_len
        if max_tokens is None:
            msg = f"this model's maximum context length is {max_len} tokens; the prompt has {n_prompt}"
        else:
            msg = (f"this model's maximum context length is {max_len} tokens; you requested "
                   f"{n_prompt + max_tokens} ({n_prompt} in the prompt, {max_tokens} to generate)")
        super().__init__(msg, param)


class RequestTooLarge(InvalidRequest):
    """The request can never fit a rank's KV pool."""


class RequestRejected(InvalidRequest):
    """A rank refused the request for a reason no other class names (the message says why)."""


class GrammarError(InvalidRequest):
    """A grammar the engine cannot compile; `param` is the request field it came from."""


class PayloadTooLarge(RequestError):
    status, code = 413, "request_too_large"


class AuthenticationError(RequestError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class ModelNotFound(RequestError):
    status, code = 404, "model_not_found"


class ClientClosed(RequestError):
    status, code = 499, "client_closed"


# ---- full now: retry later (429) ----------------------------------------------------------------
class Overloaded(EpserveError, RuntimeError):
    status, type, code, exit_code = 429, "rate_limit_error", "overloaded", 6


class KVCacheFull(Overloaded):
    code = "kv_cache_full"


class TenantRateLimited(Overloaded):
    code = "tenant_rate_limited"


# ---- the deployment is misconfigured --------------------------------------------------------------
class ConfigError(EpserveError, ValueError):
    """A configuration key or value is not valid (a YAML key, or the checkpoint's config.json);
    the message names the key, the value and what is allowed."""

    exit_code = 3


class CheckpointError(ConfigError):
    """The checkpoint on disk cannot be loaded as configured (missing, mis-shaped, unreadable)."""


# ---- nothing can serve it now (503) ---------------------------------------------------------------
class Unavailable(EpserveError, RuntimeError):
    status, code, exit_code = 503, "unavailable", 4


class NoRankAvailable(Unavailable):
    """No rank of a role may take new work: all dead or draining, or there are none (an outage,
    unlike "full", which is a 429)."""

    def __init__(self, role: str, n_ranks: int, n_dead: int, n_draining: int):
        self.role, self.n_ranks, self.n_dead, self.n_draining = role, n_ranks, n_dead, n_draining
        super().__init__(f"no {role} rank available: 0 of {n_ranks} ranks eligible "
                         f"({n_dead} dead, {n_draining} draining)", retry_after=5)


class BackendUnavailable(Unavailable):
    """A forced kernel backend cannot run here (not importable, no CUDA, or its self-test failed)."""


class DeepEPUnavailable(BackendUnavailable):
    """`ep_dispatch: deepep` was asked for and cannot run (the reason is the message)."""


# ---- a unit or rank failed the work ---------------------------------------------------------------
class UnitFailure(EpserveError, RuntimeError):
    exit_code = 5


class UnitStartFailed(UnitFailure):
    """No unit of a role could start; the message names each unit's reason."""

    status = 503


class PlacementFailed(UnitFailure):
    """The cluster could not host a unit of this shape in time, or hosted it misshapen."""

    status = 503


class DeviceAssignmentError(UnitFailure):
    """A rank's GPU cannot be found among the visible devices, or two ranks share one GPU."""


class HandoffFailed(UnitFailure):
    """The collective KV handoff of one request could not complete (the peer, the ticket or the pair)."""


class UnitFailed(UnitFailure):
    """The request's unit failed it: repeated rebuilds did not get past it (a poisoned batch)."""


class PeerLost(UnitFailure):
    """A peer rank of the unit is gone (or a peer said so): the step's agreement cannot complete
    (an elastic unit re-forms without it, actors/unit_elastic.py)."""

    status = 503


class ReformFailed(UnitFailure):
    """A member's part of an elastic unit's membership change failed (it died meanwhile, or timed
    out): the change is retried without it, or the unit is rebuilt."""


class UnitLost(UnitFailure):
    """What carried the request is gone (its unit's supervisor, or the stream sink); retry."""

    status = 503


# ---- rendering ---------------------------------------------------------------------------------
def unwrap(exc: BaseException) -> BaseException:
    """The error itself, out of Ray's task wrappers (a RayTaskError's `cause`, however deep).

    Ray raises a task's error as a RayTaskError, often as a class that also derives from the
    cause's class (so `except InvalidRequest` catches it) while its text is Ray's traceback; the
    cause is the error as raised, with its own message and fields."""
    while isinstance(getattr(exc, "cause", None), BaseException):
        exc = exc.cause
    return exc


def http_error(exc: BaseException) -> tuple[int, dict, dict]:
    """(status, OpenAI error body, headers) for any exception; one outside the family is a 500
    that names its class (an internal error, not the client's)."""
    err = unwrap(exc)
    if isinstance(err, EpserveError):
        return err.status, err.body(), err.headers
    msg = f"internal error: {type(err).__name__}: {str(err)[:300]}"
    return 500, {"error": {"message": msg, "type": "server_error", "param": None, "code": None}}, {}


def cli_error(exc: BaseException, command: str) -> tuple[str, int]:
    """(one line for stderr, exit code): the family's code; 1 for anything else."""
    err = unwrap(exc)
    lines = str(err).strip().splitlines() or [type(err).__name__]
    return f"epserve {command}: error: {lines[0]}", err.exit_code if isinstance(err, EpserveError) else 1
