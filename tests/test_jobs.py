"""Jobs: validation with reasons, identity, states."""

from __future__ import annotations

import random
from typing import Any

import pytest
from pydantic import ValidationError

from exporter.aep.fake import FakeAep
from exporter.clock import FakeClock
from exporter.destinations import DlzDestination
from exporter.engine.config import EngineConfig
from exporter.engine.lanes import LaneManager
from exporter.errors import ConfigError
from exporter.jobs import (
    TERMINAL,
    IllegalTransition,
    Job,
    JobState,
    Rejected,
    check_transition,
    parse_job,
)
from exporter.settings import Settings

GOOD: dict[str, Any] = {
    "dataset_id": "5c8c3c555033b814b69f947f",
    "destination": "lake",
    "format": "parquet",
    "compression": "gzip",
    "path": "ml/features",
}


def job(**changes: Any) -> Job:
    return Job.model_validate({**GOOD, **changes})


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"format": "json", "compression": "none"}, "", "gzip"),
        ({"format": "csv"}, "format", "parquet"),
        ({"path": "../etc"}, "path", "'..'"),
        ({"path": "a//b"}, "path", "empty"),
        ({"path": "spaces are bad"}, "path", "relative folder"),
        ({"path": "//"}, "path", "relative folder"),
        ({"dataset_id": "x y"}, "dataset_id", "dataset id"),
        ({"mode": "hourly:8"}, "mode", "hourly:9"),
        ({"mode": "daily", "after_run": "disable"}, "", "schedule"),
        ({"timeout": 0}, "timeout", "greater than 0"),
        ({"id": "../x"}, "id", "letters"),
        ({"secret": "x"}, "secret", "Extra inputs"),
        ({"destination": ""}, "destination", "at least 1"),
    ],
)
def test_bad_jobs_say_which_field_and_why(changes: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(ValidationError) as caught:
        job(**changes)
    (error,) = caught.value.errors()
    assert ".".join(str(p) for p in error["loc"]) == field
    assert words in error["msg"]


def test_slash_alone_is_the_storage_root() -> None:
    """AEP takes `/` as the folder path (docs/aep-notes.md#destination-options)."""
    assert job(path="/").path == "/"
    assert job(path=" / ").path == "/"
    assert job(path="/").job_id != job(path="ml").job_id


def test_enums_are_case_insensitive_and_paths_trimmed() -> None:
    j = job(format="PARQUET", compression="GZIP", path="/ml/features/")
    assert (j.format, j.compression, j.path) == ("parquet", "gzip", "ml/features")
    assert (j.file_type.value, j.compression_type.value) == ("PARQUET", "GZIP")


def test_after_run_defaults_follow_the_mode() -> None:
    assert job().after == "disable"
    assert job(mode="daily").after == "keep"
    assert job(after_run="keep").after == "keep"


def test_job_id_is_given_or_derived_from_content() -> None:
    assert job(id="nightly-1").job_id == "nightly-1"
    assert job().job_id == job().job_id
    assert job().job_id != job(path="ml/other").job_id
    assert job().job_id.startswith("job-")


def test_transitions_follow_the_diagram() -> None:
    check_transition(JobState.RECEIVED, JobState.FLOW_READY)
    check_transition(JobState.TRIGGERING, JobState.RUNNING)
    check_transition(JobState.RUNNING, JobState.TIMED_OUT)
    with pytest.raises(IllegalTransition):
        check_transition(JobState.RECEIVED, JobState.RUNNING)
    for state in TERMINAL:
        with pytest.raises(IllegalTransition):
            check_transition(state, JobState.RUNNING)


def test_every_check_of_a_destination_names_it_in_the_same_words() -> None:
    """The job parser, the settings' schedules and the engine's lanes refuse an unknown
    destination with one wording, listing the configured ones in order."""
    expected = "unknown destination 'nowhere'; configured: archive, lake"
    configured = {"lake": DlzDestination(type="dlz"), "archive": DlzDestination(type="dlz")}
    with pytest.raises(Rejected) as parsed:
        parse_job(
            "job.json", b'{"dataset_id": "d1", "destination": "nowhere", "path": "p"}', configured
        )
    assert str(parsed.value) == f"destination: {expected}"
    with pytest.raises(ValidationError) as loaded:
        Settings.model_validate(
            {
                "aep": {"org_id": "o@AdobeOrg", "client_id": "c", "client_secret": "s"},
                "destinations": {"lake": {"type": "dlz"}, "archive": {"type": "dlz"}},
                "schedules": [
                    {"name": "s", "interval_s": 60, "job": {**GOOD, "destination": "nowhere"}}
                ],
            }
        )
    assert f"schedule 's': {expected}" in str(loaded.value)
    clock = FakeClock()
    lanes = LaneManager(
        FakeAep(clock),
        configured,
        EngineConfig(),
        org_id="o",
        sandbox="prod",
        clock=clock,
        identity_key=b"k",
        rng=random.Random(0),
    )
    with pytest.raises(ConfigError, match=f"^{expected}$"):
        lanes.destination("nowhere")
