"""`aep-exporter check`: is this configuration ready to export? (in the spirit of `dbt debug`)

It asks AEP, and changes nothing there:

1. credential — IMS issues a token for the client id and secret;
2. sandbox — the platform answers for the org and sandbox (a list of destination flows);
3. flow budget — how many of `engine.max_flows` destination flows the sandbox has left;
4. permissions — the reads dataset export needs are allowed (View Destinations; View Datasets
   and Manage and Activate Dataset Destinations for the list of exportable datasets);
5. destinations — each configured destination's credentials and parameters against the JSON
   Schemas of AEP's live connection spec for its storage;
6. pending jobs — each job waiting in the spool, unfinished in the journal, or made by a
   schedule, names a dataset AEP lists as exportable, and a path and format the spec takes.

One line per finding on standard output; each problem says what to fix. Exit codes: 0 healthy,
1 problems found, 2 the configuration (or a job file named on the line) cannot be read.
Creating entities (the Manage permission) is not tried: `check` leaves the sandbox as it was.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import sqlite3
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from exporter.aep.auth import OPERATION as IMS_OPERATION
from exporter.aep.client import HttpAep
from exporter.aep.facts import FLOW_SERVICE_PATH, SPEC_VERSION
from exporter.aep.spec_check import auth_problems, encryption_problems, target_problems
from exporter.datasets_cli import exportable_datasets
from exporter.destinations import Destination, unknown_destination
from exporter.errors import AepError, AuthError, NotFoundError, TransportError
from exporter.jobs import Job, Rejected
from exporter.settings import Settings, add_config_argument

EXIT_HEALTHY, EXIT_PROBLEMS, EXIT_CONFIG = 0, 1, 2
DEFAULT_TIMEOUT_S = 60.0
# A check is a question, not an export: give up on a silent host after two tries, not after
# the export's five minutes of backoff.
CHECK_ATTEMPTS, CHECK_ELAPSED_S = 2, 20.0
SAMPLE_PATH = "aep-exporter-check"  # a destination's parameters are checked with this path
CONSOLE = "the Adobe Developer Console (https://developer.adobe.com/console)"


class Status(enum.StrEnum):
    OK = "ok"
    PROBLEM = "problem"
    SKIPPED = "skipped"


@dataclass(frozen=True, slots=True)
class Finding:
    """One line of the report: what was checked, and what was found or what to fix."""

    status: Status
    subject: str
    text: str

    def line(self) -> str:
        return f"{self.status.value:<8} {self.subject}: {self.text}"


@dataclass(frozen=True, slots=True)
class PendingJob:
    """A job that will be exported: where it waits, and the job."""

    where: str
    job: Job


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)

    def ok(self, subject: str, text: str) -> None:
        self.findings.append(Finding(Status.OK, subject, text))

    def problem(self, subject: str, text: str) -> None:
        self.findings.append(Finding(Status.PROBLEM, subject, text))

    def skipped(self, subject: str, text: str) -> None:
        self.findings.append(Finding(Status.SKIPPED, subject, text))

    def refused(self, permission: str, exc: AepError, sandbox: str) -> None:
        """A read AEP refused for want of `permission` (said once per permission)."""
        line = Finding(Status.PROBLEM, "permissions", _permission_problem(exc, permission, sandbox))
        if not any(f.subject == "permissions" and permission in f.text for f in self.findings):
            self.findings.append(line)

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.status is Status.PROBLEM]


# -- pending jobs (local) -----------------------------------------------------------------


def pending_jobs(settings: Settings, files: Sequence[Path], report: Report) -> list[PendingJob]:
    """The jobs to check: `files`, the spool's incoming/ and processing/ job files, the
    journal's unfinished jobs and each enabled schedule's job. A spool file that is not a
    usable job is reported (the daemon would reject it)."""
    from exporter.daemon.journal import FILE_NAME
    from exporter.sources.spool import RESULT_SUFFIX, Spool

    spool = Spool(settings.daemon.spool_dir, max_bytes=settings.daemon.max_job_file_bytes)
    found: list[PendingJob] = []
    paths = list(files)
    for folder in ("incoming", "processing"):
        directory = spool.dirs[folder]
        if directory.is_dir():
            paths += sorted(
                p
                for p in directory.iterdir()
                if not p.name.startswith(".")
                and not p.name.endswith((".tmp", RESULT_SUFFIX))
                and p.is_file()
            )
    for path in paths:
        try:
            found.append(
                PendingJob(f"job file {path}", spool.read(path, settings.destinations).job)
            )
        except Rejected as exc:
            report.problem(f"job file {path}", f"{exc} (the daemon would reject it)")
    found += _journal_jobs(settings.daemon.state_dir / FILE_NAME, report)
    found += [PendingJob(f"schedule {s.name}", s.job) for s in settings.schedules if s.enabled]
    return found


def _journal_jobs(path: Path, report: Report) -> list[PendingJob]:
    from exporter.daemon.journal import JobRecord
    from exporter.daemon.journal_file import connect
    from exporter.jobs import TERMINAL

    if not path.is_file():
        return []
    try:
        conn = connect(path, readonly=True)
        try:
            marks = ",".join("?" * len(TERMINAL))
            rows = conn.execute(
                f"SELECT * FROM jobs WHERE state NOT IN ({marks}) ORDER BY created",  # noqa: S608
                [s.value for s in TERMINAL],
            ).fetchall()
        finally:
            conn.close()
    except (sqlite3.Error, OSError) as exc:
        report.problem("journal", f"{path} cannot be read: {exc}")
        return []
    found = []
    for row in rows:
        record = JobRecord.from_row(row)
        try:
            job = Job.model_validate(record.spec)
        except ValidationError:
            continue  # a record without its document (a recovered run): nothing to check
        found.append(PendingJob(f"journal job {record.job_id}", job))
    return found


# -- AEP ------------------------------------------------------------------------------------


def _refused(exc: AepError) -> bool:
    """Whether the platform (not IMS) said this credential may not do this."""
    return isinstance(exc, AuthError) and exc.status == 403


async def run_checks(
    settings: Settings, api: HttpAep, jobs: Sequence[PendingJob], report: Report
) -> Report:
    """Every check against AEP, in order, into `report` (so that what was found before a
    timeout is kept); later checks are skipped when an earlier one makes them meaningless
    (no token, no sandbox)."""
    aep = settings.aep
    try:
        await api.check_token()
    except AepError as exc:
        report.problem("credential", _token_problem(exc, settings))
        report.skipped("AEP", "sandbox, permissions, destinations and datasets need a token")
        return report
    report.ok("credential", f"IMS issued a token to client {aep.client_id} ({aep.ims_url})")
    try:
        used = await api.count_destination_flows()
    except NotFoundError as exc:
        report.problem(
            "sandbox",
            f"sandbox {aep.sandbox!r} is unknown to org {aep.org_id} ({exc}): set aep.sandbox "
            "to a sandbox name as Experience Platform's Sandboxes page lists it (lower case)",
        )
        report.skipped("AEP", "permissions, destinations and datasets need a sandbox")
        return report
    except AepError as exc:
        if not _refused(exc):
            report.problem("sandbox", f"AEP did not answer for sandbox {aep.sandbox!r}: {exc}")
            report.skipped("AEP", "permissions, destinations and datasets")
            return report
        report.refused("View Destinations", exc, aep.sandbox)
    else:
        report.ok("sandbox", f"{aep.sandbox} answers for org {aep.org_id}")
        left = settings.engine.max_flows - used
        budget = (
            f"{used} of engine.max_flows = {settings.engine.max_flows} destination flows in "
            f"use, {max(left, 0)} left"
        )
        if left > 0:
            report.ok("flow budget", budget)
        else:
            report.problem(
                "flow budget",
                f"{budget}: new exports wait for room; retire idle lanes "
                "(`aep-exporter lanes prune`) or delete unused dataflows in AEP",
            )
    specs = await _destinations(settings, api, report)
    await _datasets(settings, api, jobs, report)
    _job_parameters(settings, specs, jobs, report)
    if not any(f.subject == "permissions" for f in report.findings):
        report.ok(
            "permissions",
            "AEP allowed every read (destination flows, connection specs, exportable "
            "datasets); creating flows (Manage and Activate Dataset Destinations) is first "
            "tried by an export",
        )
    return report


def _token_problem(exc: AepError, settings: Settings) -> str:
    aep = settings.aep
    if isinstance(exc, AuthError) and exc.operation == IMS_OPERATION:
        return (
            f"IMS refused client {aep.client_id} ({exc}): check aep.client_id and the client "
            f"secret against the project's OAuth Server-to-Server credential in {CONSOLE}"
        )
    if isinstance(exc, TransportError):
        return f"IMS at {aep.ims_url} cannot be reached ({exc}): check aep.ims_url and the network"
    return f"no token from IMS at {aep.ims_url}: {exc}"


def _permission_problem(exc: AepError, permission: str, sandbox: str) -> str:
    return (
        f"AEP refused a read that needs {permission} ({exc}): add the permission, for "
        f"sandbox {sandbox!r}, to a role (or product profile) that holds the credential's "
        "technical account (Experience Platform, Permissions)"
    )


async def _destinations(
    settings: Settings, api: HttpAep, report: Report
) -> dict[str, Mapping[str, Any]]:
    """Each destination against its live connection spec; returns the specs by id."""
    if not settings.destinations:
        report.ok("destinations", "none configured (jobs need at least one)")
        return {}
    ids = sorted({d.spec.connection_spec_id for d in settings.destinations.values()})
    try:
        answer = await api.transport.request(
            "GET",
            f"{FLOW_SERVICE_PATH}/connectionSpecs",
            operation="connectionSpecs.list",
            query=[("property", "id==" + ",".join(ids))],
        )
    except AepError as exc:
        if _refused(exc):
            report.refused("View Destinations", exc, settings.aep.sandbox)
        else:
            report.problem("destinations", f"the connection specs could not be read: {exc}")
        return {}
    body = answer.body if isinstance(answer.body, Mapping) else {}
    specs = {str(s.get("id")): s for s in body.get("items") or () if isinstance(s, Mapping)}
    for name, dest in sorted(settings.destinations.items()):
        _destination(name, dest, specs, report)
    return specs


def _destination(
    name: str, dest: Destination, specs: Mapping[str, Mapping[str, Any]], report: Report
) -> None:
    subject = f"destination {name}"
    spec = specs.get(dest.spec.connection_spec_id)
    if spec is None:
        report.problem(
            subject,
            f"AEP does not list the {dest.spec.name} connection spec "
            f"{dest.spec.connection_spec_id}: dataset export to this storage is not available "
            "in this org",
        )
        return
    version = str(spec.get("version", SPEC_VERSION))
    found = auth_problems(spec, dest.auth())
    found += encryption_problems(spec, dest.encryption())
    found += target_problems(spec, _target_params(dest, SAMPLE_PATH, "PARQUET", "GZIP"))
    for problem in found:
        report.problem(
            subject, f"AEP's {dest.spec.name} spec (version {version}) refuses {problem}"
        )
    if not found:
        report.ok(
            subject,
            f"{dest.describe()}: credentials and parameters fit AEP's {dest.spec.name} spec "
            f"(version {version})",
        )


def _target_params(
    dest: Destination, path: str, file_type: str, compression: str
) -> dict[str, Any]:
    """The target connection's parameters, as the engine sends them."""
    return {
        "mode": "Server-to-server",
        **dest.location(),
        dest.spec.path_param: path,
        "datasetFileType": file_type,
        "compression": compression,
    }


def _job_parameters(
    settings: Settings,
    specs: Mapping[str, Mapping[str, Any]],
    jobs: Iterable[PendingJob],
    report: Report,
) -> None:
    """The parts of the target parameters a job brings (path, format, compression)."""
    for pending in jobs:
        job = pending.job
        dest = settings.destinations.get(job.destination)
        if dest is None:
            report.problem(
                pending.where, unknown_destination(job.destination, settings.destinations)
            )
            continue
        spec = specs.get(dest.spec.connection_spec_id)
        if spec is None:
            continue
        own = {f"params.{k}" for k in (dest.spec.path_param, "datasetFileType", "compression")}
        params = _target_params(dest, job.path, job.file_type.value, job.compression_type.value)
        for problem in target_problems(spec, params):
            if problem.split(":", 1)[0] in own:
                report.problem(pending.where, f"AEP's {dest.spec.name} spec refuses {problem}")


async def _datasets(
    settings: Settings, api: HttpAep, jobs: Sequence[PendingJob], report: Report
) -> None:
    sandbox = settings.aep.sandbox
    try:
        exportable = {d.id: d.name for d in await exportable_datasets(api.transport)}
    except AepError as exc:
        if _refused(exc):
            report.refused("View Datasets", exc, sandbox)
        else:
            report.problem("datasets", f"the exportable datasets could not be listed: {exc}")
        return
    if not jobs:
        report.ok("datasets", f"{len(exportable)} exportable in {sandbox}; no pending jobs")
        return
    bad = 0
    for pending in jobs:
        dataset = pending.job.dataset_id
        if dataset not in exportable:
            bad += 1
            report.problem(
                pending.where,
                f"dataset {dataset} is not among the {len(exportable)} datasets AEP lets "
                f"sandbox {sandbox} export: check the id with `aep-exporter datasets list`",
            )
    if not bad:
        report.ok("datasets", f"the {len(jobs)} pending job(s) name exportable datasets")


# -- command ----------------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "check",
        help="check credentials, sandbox, permissions, destinations and pending jobs against AEP",
        description="Ask AEP whether this configuration can export: the credential, the "
        "sandbox, the flow budget, the permissions, each destination against AEP's connection "
        "specs, and each pending job's dataset. Changes nothing in AEP. Exit codes: 0 healthy, "
        "1 problems found (one line each, with what to fix), 2 bad configuration.",
    )
    p.add_argument(
        "jobs", nargs="*", type=Path, metavar="JOB_FILE", help="job files to check as well"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help="give up after this many seconds (default %(default)s)",
    )
    add_config_argument(p)
    p.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    from rich.console import Console

    from exporter.logs import configure_logging
    from exporter.oneshot import settings_or_report

    err = Console(stderr=True, soft_wrap=True)
    settings = settings_or_report(args, err)
    if settings is None:
        return EXIT_CONFIG
    if args.timeout <= 0:
        err.print("error: --timeout must be above 0", markup=False, highlight=False)
        return EXIT_CONFIG
    missing = [p for p in args.jobs if not p.is_file()]
    if missing:
        err.print(f"error: no such job file: {', '.join(map(str, missing))}", highlight=False)
        return EXIT_CONFIG
    configure_logging("error")
    local, report = Report(), Report()
    jobs = pending_jobs(settings, args.jobs, local)
    try:
        asyncio.run(_check(settings, jobs, args.timeout, report))
    except TimeoutError:
        report.problem("AEP", f"the checks did not finish within {args.timeout:g} s")
    report.findings += local.findings
    for finding in report.findings:
        print(finding.line())
    problems = len(report.problems)
    print(f"{problems} problem(s)" if problems else "healthy: ready to export")
    sys.stdout.flush()
    return EXIT_PROBLEMS if problems else EXIT_HEALTHY


async def _check(
    settings: Settings, jobs: Sequence[PendingJob], timeout_s: float, report: Report
) -> Report:
    config = settings.aep.model_copy(
        update={
            "max_attempts": min(settings.aep.max_attempts, CHECK_ATTEMPTS),
            "max_elapsed_s": min(settings.aep.max_elapsed_s, CHECK_ELAPSED_S),
        }
    )
    async with asyncio.timeout(timeout_s), HttpAep.from_config(config) as api:
        return await run_checks(settings, api, jobs, report)
