"""`aep-exporter emulator`'s options come from the `Knobs` model: one per knob, with the
model's type, default and description, under the names README, bench and the demo use."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from aep_emulator import cli
from aep_emulator.settings import Knobs, Span


def emulator_parser() -> argparse.ArgumentParser:
    subparsers = argparse.ArgumentParser(prog="aep-exporter").add_subparsers()
    cli.add_parser(subparsers)
    return subparsers._name_parser_map["emulator"]


def knobs(*argv: str) -> Knobs:
    return cli.knobs_from(emulator_parser().parse_args(list(argv)))


def knob_actions() -> dict[str, argparse.Action]:
    return {a.dest: a for a in emulator_parser()._actions if a.dest in Knobs.model_fields}


def test_every_knob_has_an_option_whose_default_is_the_models() -> None:
    actions = knob_actions()
    assert set(actions) == set(Knobs.model_fields)
    for name, action in actions.items():
        field = Knobs.model_fields[name]
        if action.option_strings == ["--client-secret-file"]:
            assert action.default is None  # no file: the model's default secret
            continue
        assert action.default == field.get_default(call_default_factory=True), name
        assert field.description
        assert action.help is not None
        assert action.help.startswith(field.description.replace("%", "%%")), name


def test_no_options_give_the_models_defaults() -> None:
    # (but the client secret: each Knobs makes its own at random)
    assert knobs().model_dump(exclude={"client_secret"}) == Knobs().model_dump(
        exclude={"client_secret"}
    )


def test_every_knobs_has_its_own_random_client_secret() -> None:
    secrets = {Knobs().client_secret for _ in range(50)}
    assert len(secrets) == 50
    assert all(len(s) >= 32 for s in secrets)


# The options as they were written out by hand, before being derived from the model: each
# still sets its knob (README, bench/, exporter/demo.py and the tests use them).
KEPT: list[tuple[list[str], str, Any]] = [
    (["--client-id", "c"], "client_id", "c"),
    (["--org-id", "o@AdobeOrg"], "org_id", "o@AdobeOrg"),
    (["--sandbox", "a", "--sandbox", "b"], "sandboxes", ["a", "b"]),
    (["--token-lifetime", "5"], "token_lifetime_s", 5.0),
    (["--time-scale", "0.01"], "time_scale", 0.01),
    (["--not-ready-window", "0"], "not_ready_window_s", 0.0),
    (["--run-duration", "5-10"], "run_duration_s", Span(min=5, max=10)),
    (["--run-failure-rate", "0.5"], "run_failure_rate", 0.5),
    (["--run-partial-rate", "0.25"], "run_partial_rate", 0.25),
    (["--adhoc-disabled-flow-spec", "f"], "adhoc_disabled_flow_specs", ["f"]),
    (["--max-destination-flows", "3"], "max_destination_flows", 3),
    (["--adhoc-max-datasets-per-call", "2"], "adhoc_max_datasets_per_call", 2),
    (["--latency-ms", "1-2"], "latency_ms", Span(min=1, max=2)),
    (["--rate-limit", "7"], "rate_limit_rps", 7.0),
    (["--rate-limit-burst", "3"], "rate_limit_burst", 3.0),
    (["--retry-after", "never"], "retry_after", "never"),
    (["--error-429-rate", "0.1"], "error_429_rate", 0.1),
    (["--error-5xx-rate", "0.2"], "error_5xx_rate", 0.2),
    (["--drop-rate", "0.3"], "drop_rate", 0.3),
    (["--slow-rate", "0.4"], "slow_rate", 0.4),
    (["--slow-ms", "9"], "slow_ms", 9.0),
    (["--allow-json-uncompressed"], "allow_json_uncompressed", True),
    (["--seed", "42"], "seed", 42),
]


@pytest.mark.parametrize(("argv", "name", "value"), KEPT, ids=[k[0][0] for k in KEPT])
def test_the_options_keep_their_names(argv: list[str], name: str, value: Any) -> None:
    assert value != Knobs.model_fields[name].get_default(call_default_factory=True)
    assert getattr(knobs(*argv), name) == value


def test_a_repeated_option_replaces_its_default_list_rather_than_extending_it() -> None:
    assert knobs("--sandbox", "x").sandboxes == ["x"]
    assert knobs().sandboxes == ["prod", "dev"]


def test_the_secret_comes_from_the_file_the_option_names(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t\n")
    assert knobs("--client-secret-file", str(secret)).client_secret == "s3cr3t"


def test_help_shows_defaults_as_they_are_typed() -> None:
    text = " ".join(emulator_parser().format_help().split())
    assert "--run-duration A-B emulated run duration, uniform in [A, B] (default 20-60)" in text
    assert "(default prod, dev)" in text
    assert "--max-rows-per-file N" in text
    assert "--journal-size N" in text


def test_bad_values_are_refused_by_the_models_rules() -> None:
    with pytest.raises(ValueError, match="time_scale"):
        knobs("--time-scale", "0")
