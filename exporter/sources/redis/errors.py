"""Which Redis failures may pass by waiting (the store retries those) and which may not."""

from __future__ import annotations

from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Unreachable (LOADING arrives as BusyLoadingError, a ConnectionError), or refusing for a
# while: OOM (maxmemory), READONLY (a replica), MASTERDOWN (a replica without its master).
RETRYABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    OutOfMemoryError,
    ReadOnlyError,
    MasterDownError,
    OSError,
)
# Passing states that redis-py reports as a plain ResponseError, by the reply's first word:
# writes stopped after a failed save, busy with a script, too few replicas for a write.
RETRYABLE_CODES = frozenset({"MISCONF", "BUSY", "NOREPLICAS"})


def retryable(exc: BaseException) -> bool:
    """Whether waiting may help: Redis unreachable, or refusing commands for a while."""
    if isinstance(exc, (AuthenticationError, AuthorizationError)):
        return False  # a wrong password does not get better by waiting
    if isinstance(exc, RETRYABLE):
        return True
    return isinstance(exc, ResponseError) and reply_code(exc) in RETRYABLE_CODES


def reply_code(exc: ResponseError) -> str:
    """The first word of Redis's error reply, also where redis-py wrapped it for a command
    of a pipeline ("Command # 1 (...) of pipeline caused error: ('BUSY ...',)")."""
    message = str(exc)
    _, wrapped, inner = message.partition(" of pipeline caused error: ")
    return (inner.lstrip("('\"") if wrapped else message).split(" ", 1)[0]
