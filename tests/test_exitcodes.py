"""The exit codes: one table in the code, the same in README.md, coherent with the daemon's."""

from __future__ import annotations

import json
from pathlib import Path

from exporter import check, datasets_cli, lanes_cli
from exporter.aep.envelopes import ConnectError, DnsError
from exporter.daemon.core import EXIT_CONFIG, EXIT_DATAERR, EXIT_SOFTWARE
from exporter.errors import AepError, AuthError, ConfigError, ServerError
from exporter.exitcodes import Exit, for_error, for_outcome, table
from exporter.jobs import JobState, Outcome
from exporter.ops import probe

ROOT = Path(__file__).resolve().parent.parent


def test_readme_carries_the_table_of_the_code() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- exit-codes:start -->\n") + len("<!-- exit-codes:start -->\n")
    end = readme.index("\n<!-- exit-codes:end -->")
    assert readme[start:end] == table()


def test_codes_are_distinct_and_each_has_a_meaning() -> None:
    assert len({int(c) for c in Exit}) == len(Exit)
    assert all(c.meaning.endswith(".") for c in Exit)


def test_the_other_commands_and_systemd_agree() -> None:
    assert (EXIT_CONFIG, EXIT_DATAERR, EXIT_SOFTWARE) == (
        Exit.BAD_INPUT,
        Exit.CORRUPT_JOURNAL,
        Exit.INTERNAL,
    )
    assert (lanes_cli.EXIT_OK, lanes_cli.EXIT_AEP, lanes_cli.EXIT_CONFIG) == (
        Exit.OK,
        Exit.FAILED,
        Exit.BAD_INPUT,
    )
    assert lanes_cli.EXIT_INTERRUPTED == Exit.INTERRUPTED
    assert (probe.EXIT_UNHEALTHY, probe.EXIT_CONFIG) == (Exit.FAILED, Exit.BAD_INPUT)
    assert (check.EXIT_HEALTHY, check.EXIT_PROBLEMS, check.EXIT_CONFIG) == (
        Exit.OK,
        Exit.FAILED,
        Exit.BAD_INPUT,
    )
    assert (datasets_cli.EXIT_LISTED, datasets_cli.EXIT_AEP, datasets_cli.EXIT_CONFIG) == (
        Exit.OK,
        Exit.FAILED,
        Exit.BAD_INPUT,
    )
    unit = (ROOT / "config/aep-exporter.service").read_text()
    assert f"RestartPreventExitStatus={Exit.BAD_INPUT:d} {Exit.CORRUPT_JOURNAL:d}" in unit


def test_outcomes_and_errors_map_to_the_six_that_tell_apart() -> None:
    assert for_outcome(JobState.SUCCEEDED) == Exit.OK
    assert for_outcome(JobState.FAILED) == Exit.FAILED
    assert for_outcome(JobState.FAILED, "aep") == Exit.FAILED
    assert for_outcome(JobState.FAILED, "auth") == Exit.CREDENTIALS_REFUSED
    assert for_outcome(JobState.FAILED, "unreachable") == Exit.UNREACHABLE
    assert for_outcome(JobState.REJECTED) == Exit.BAD_INPUT
    assert for_outcome(JobState.TIMED_OUT) == Exit.TIMED_OUT
    assert for_outcome(JobState.TRIGGERING) == Exit.INTERNAL  # not an outcome
    assert for_error(ConfigError("x")) == Exit.BAD_INPUT
    assert for_error(AuthError("x")) == Exit.CREDENTIALS_REFUSED
    assert for_error(ConnectError("x")) == Exit.UNREACHABLE
    assert for_error(DnsError("x")) == Exit.UNREACHABLE
    assert for_error(ServerError("x")) == Exit.FAILED
    assert for_error(AepError("x")) == Exit.FAILED
    assert for_error(RuntimeError("x")) == Exit.INTERNAL


def test_the_cause_is_for_the_exit_code_only_never_in_results_or_the_journal() -> None:
    outcome = Outcome(job_id="j", state=JobState.FAILED, cause="auth")
    assert for_outcome(outcome.state, outcome.cause) == Exit.CREDENTIALS_REFUSED
    assert "cause" not in outcome.model_dump()
    assert "cause" not in json.loads(outcome.model_dump_json())
