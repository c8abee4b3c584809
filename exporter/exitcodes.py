"""The exit codes of every `aep-exporter` command, in one place (README.md has the table).

Small numbers say how a command's work ended; 65 and 70 follow sysexits.h for what systemd's
unit must not restart blindly (`RestartPreventExitStatus=2 65`); 128+N is "stopped by signal
N", as shells report it. A script can tell "try again later" (3, 5) from "fix something
first" (2, 4) without reading the output.
"""

from __future__ import annotations

from enum import IntEnum

from exporter.errors import AepError, AuthError, ConfigError, TransportError


class Exit(IntEnum):
    """An exit code and what it means (`meaning`, one sentence or three)."""

    meaning: str

    def __new__(cls, value: int, meaning: str = "") -> Exit:
        member = int.__new__(cls, value)
        member._value_ = value
        member.meaning = meaning
        return member

    OK = (
        0,
        "Succeeded (for `export --no-wait`: the run was triggered).",
    )
    FAILED = (
        1,
        "The export failed in AEP (the run failed, or AEP refused a request); the output says "
        "AEP's reason. For `probe`: unhealthy; for `validate`: a job file is bad; for `check`: "
        "a problem found (one line each).",
    )
    BAD_INPUT = (
        2,
        "Bad usage, configuration or job: nothing was sent, or AEP was not asked to do "
        "anything that could succeed as given. Also argparse's code for a bad command line.",
    )
    TIMED_OUT = (
        3,
        "The job's `--timeout` passed before its run ended; the run may go on in AEP.",
    )
    CREDENTIALS_REFUSED = (
        4,
        "IMS refused the client id or secret, or the gateway refused the token: check the "
        "credential and its product profile (see `aep-exporter check`).",
    )
    UNREACHABLE = (
        5,
        "AEP (or IMS) could not be reached: DNS, refused connection, timeouts, TLS. Retrying "
        "later may help; the output names the host.",
    )
    DELIVERY_MISMATCH = (
        6,
        "The run succeeded in AEP, but the destination's `verify` section found the export "
        "folder differing from it (or missing); the output says what differs.",
    )
    CORRUPT_JOURNAL = (
        65,
        "`run`: the journal is not a usable database (sysexits' EX_DATAERR); the log says how "
        "to recover. systemd does not restart on it.",
    )
    INTERNAL = (
        70,
        "`run`: a supervised task died (sysexits' EX_SOFTWARE); a restart may help.",
    )
    INTERRUPTED = (
        130,
        "Stopped by Ctrl-C (SIGINT, 128+2); a run already triggered goes on in AEP.",
    )
    TERMINATED = (
        143,
        "Stopped by SIGTERM (128+15), e.g. `docker stop`; a run already triggered goes on.",
    )


def for_error(exc: BaseException) -> Exit:
    """The code for an error that ended a command before (or instead of) an outcome."""
    if isinstance(exc, ConfigError):
        return Exit.BAD_INPUT
    if isinstance(exc, AuthError):
        return Exit.CREDENTIALS_REFUSED
    if isinstance(exc, TransportError):
        return Exit.UNREACHABLE
    if isinstance(exc, AepError):
        return Exit.FAILED
    return Exit.INTERNAL


STATES = {
    "succeeded": Exit.OK,
    "running": Exit.OK,  # `--no-wait`: triggered
    "failed": Exit.FAILED,
    "rejected": Exit.BAD_INPUT,
    "timed_out": Exit.TIMED_OUT,
    "cancelled": Exit.INTERRUPTED,
    "delivery_mismatch": Exit.DELIVERY_MISMATCH,
}
CAUSES = {"auth": Exit.CREDENTIALS_REFUSED, "unreachable": Exit.UNREACHABLE}


def for_outcome(state: str, cause: str = "") -> Exit:
    """The code for a job's outcome: its state (a `JobState`), and for a failure its cause
    (`Outcome.cause`). An unfinished state here is a bug of the caller's: INTERNAL."""
    if state == "failed" and cause in CAUSES:
        return CAUSES[cause]
    return STATES.get(state, Exit.INTERNAL)


def table() -> str:
    """The codes as a Markdown table (README.md carries it; a test keeps the two equal)."""
    rows = ["| code | name | meaning |", "|---|---|---|"]
    for code in Exit:
        rows.append(f"| {int(code)} | `{code.name.lower()}` | {code.meaning} |")
    return "\n".join(rows)
