"""The spool: parsing job files, claiming them atomically, filing them with their result,
and every case of the bad-input corpus (tests/bad_jobs.py) rejected with a usable reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from exporter.clock import FakeClock
from exporter.jobs import Job, JobState, Outcome, Rejected, parse_job
from exporter.sources.spool import RESULT_SUFFIX, Spool
from tests.bad_jobs import (
    BY_NAME,
    CASES,
    DESTINATIONS,
    MAX_JOB_FILE_BYTES,
    Case,
    as_json,
    as_yaml,
)

DESTS: dict[str, object] = dict.fromkeys(DESTINATIONS)
ROOT = os.geteuid() == 0
SPOOL_CASES = [c for c in CASES if c.caught_by == "spool"]
MAX_REASON = 500  # characters: a reason is read by a person, not scrolled through


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    made = Spool(tmp_path / "spool", max_bytes=MAX_JOB_FILE_BYTES)
    made.ensure()
    return made


def drop(spool: Spool, name: str, raw: bytes, *, mtime: float | None = None) -> Path:
    path = spool.dirs["incoming"] / name
    path.write_bytes(raw)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def rejection(spool: Spool, case: Case) -> str:
    """Create the case in incoming/, claim it as the daemon does, and read it."""
    claimed = spool.claim(case.create(spool.dirs["incoming"] / case.name))
    assert claimed is not None
    with pytest.raises(Rejected) as caught:
        spool.read(claimed, DESTS)
    return str(caught.value)


def outcome(state: JobState = JobState.REJECTED, message: str = "bad") -> Outcome:
    return Outcome(job_id="j1", state=state, message=message)


# -- parse_job ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("a.json", as_json(format="JSON")),
        ("a.yaml", as_yaml(format="JSON")),
        ("a.yml", as_yaml(format="JSON")),
        (
            "a.toml",
            b'dataset_id = "ds_0001"\ndestination = "lake"\npath = "ml/features"\n'
            b'format = "JSON"\n',
        ),
    ],
)
def test_the_three_formats_make_the_same_job(name: str, raw: bytes) -> None:
    parsed = parse_job(name, raw, DESTS)
    assert parsed.job == Job(
        dataset_id="ds_0001", destination="lake", path="ml/features", format="json"
    )
    assert parsed.spec == {
        "dataset_id": "ds_0001",
        "destination": "lake",
        "path": "ml/features",
        "format": "json",
    }


def test_the_spec_kept_for_the_journal_is_json_whatever_yaml_made() -> None:
    # YAML's !!binary makes bytes, which pydantic accepts for a string; the journal stores
    # the spec as JSON, so a raw spec with bytes in it would crash the daemon's intake.
    raw = b"dataset_id: !!binary ZHNfMDAwMQ==\ndestination: lake\npath: ml/x\ntimeout: 60\n"
    parsed = parse_job("b.yaml", raw, DESTS)
    assert parsed.job.dataset_id == "ds_0001"
    assert json.loads(json.dumps(parsed.spec)) == parsed.spec
    assert Job.model_validate(parsed.spec) == parsed.job
    assert Job.model_validate(parsed.spec).job_id == parsed.job.job_id


def test_a_leading_slash_is_the_destination_root_not_the_machine_root() -> None:
    # `path` is a folder in the destination (a bucket prefix, a landing zone folder), never a
    # local path: "/etc" is the folder "etc" there (tests/test_jobs.py trims slashes on
    # purpose). Climbing out with ".." is what is refused (see the corpus).
    assert parse_job("a.json", as_json(path="/etc"), DESTS).job.path == "etc"


def test_without_destinations_the_reason_says_none_are_configured() -> None:
    with pytest.raises(Rejected, match="unknown destination 'lake'; configured: none"):
        parse_job("a.json", as_json(), {})


# -- the corpus through Spool.read -------------------------------------------------------------


def test_the_corpus_is_big_and_varied() -> None:
    assert len(CASES) >= 45
    assert len(SPOOL_CASES) >= 45
    assert {Path(c.name).suffix for c in CASES} >= {".json", ".yaml", ".toml", ".txt", ""}
    assert sum(not isinstance(c.make, bytes) for c in CASES) >= 6  # links, dir, FIFO, mode 000


@pytest.mark.parametrize(
    "case", [c for c in SPOOL_CASES if not c.needs_non_root], ids=lambda c: c.name
)
def test_each_bad_file_is_rejected_with_a_reason_to_act_on(spool: Spool, case: Case) -> None:
    reason = rejection(spool, case)
    missing = [w for w in case.expect if w not in reason]
    assert not missing, f"{case.what}: {reason!r} lacks {missing}"
    assert len(reason) <= MAX_REASON, reason


@pytest.mark.skipif(ROOT, reason="root reads files whatever their mode: see the next test")
def test_an_unreadable_file_is_rejected(spool: Spool) -> None:
    reason = rejection(spool, BY_NAME["unreadable.json"])
    assert all(w in reason for w in BY_NAME["unreadable.json"].expect), reason


CHILD = """
import os, sys
from pathlib import Path
from exporter.jobs import Rejected
from exporter.sources.spool import Spool
spool = Spool(Path(sys.argv[1]), max_bytes=4096)
os.setgroups([])
os.setgid(65534)
os.setuid(65534)  # nobody: from here on, file modes apply
for name in sys.argv[2:]:
    try:
        spool.read(spool.dirs["processing"] / name, {"lake": None})
    except Rejected as exc:
        print(f"{name} {os.geteuid()} rejected: {exc}")
    else:
        print(f"{name} {os.geteuid()} read")
"""


@pytest.mark.skipif(not ROOT, reason="covered in-process by the previous test")
def test_an_unreadable_file_is_rejected_when_the_daemon_is_not_root() -> None:
    # Root has CAP_DAC_OVERRIDE: mode 000 does not stop it, so no honest unreadable file
    # exists for root. A child imports the spool as root, drops to `nobody`, then reads.
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp).chmod(0o755)  # nobody may enter; pytest's tmp_path is root's alone
        spool = Spool(Path(tmp) / "spool", max_bytes=4096)
        spool.ensure()
        BY_NAME["unreadable.json"].create(spool.dirs["processing"] / "unreadable.json")
        (spool.dirs["processing"] / "readable.json").write_bytes(as_json())
        child = subprocess.run(  # noqa: S603 - fixed arguments
            [sys.executable, "-c", CHILD, str(spool.root), "unreadable.json", "readable.json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    if "Operation not permitted" in child.stderr:
        pytest.skip("this root may not change its uid (no CAP_SETUID)")
    assert child.returncode == 0, child.stderr
    lines = child.stdout.splitlines()
    assert lines[0] == (
        "unreadable.json 65534 rejected: cannot read the file: Permission denied"
    ), lines
    assert lines[1] == "readable.json 65534 read", lines  # the same child, a readable file


def test_a_duplicate_id_is_a_good_file_on_its_own(spool: Spool) -> None:
    # Only the journal knows an id was taken: tests/test_daemon_intake.py covers that case.
    case = BY_NAME["duplicate-id.json"]
    claimed = spool.claim(case.create(spool.dirs["incoming"] / case.name))
    assert claimed is not None
    assert spool.read(claimed, DESTS).job.id is not None


def test_a_yaml_alias_bomb_stays_small(spool: Spool) -> None:
    # 9**9 strings if aliases were expanded; PyYAML keeps them as references to one list,
    # and nothing on the way to the rejection walks them.
    for name in ("yaml-billion-laughs.yaml", "yaml-merge-bomb.yaml"):
        tracemalloc.start()
        try:
            rejection(spool, BY_NAME[name])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 2_000_000, (name, peak)


def test_a_fifo_is_not_opened(spool: Spool) -> None:
    # Opening a FIFO without a writer blocks; the reason comes from lstat alone.
    reason = rejection(spool, BY_NAME["pipe.json"])
    assert reason.startswith("a FIFO")
    assert (spool.dirs["processing"] / "pipe.json").is_fifo()


def test_the_size_limit_is_checked_before_reading(spool: Spool, tmp_path: Path) -> None:
    path = spool.dirs["processing"] / "sparse.json"
    with path.open("wb") as handle:
        handle.truncate(10 * 1024**3)  # 10 GiB, sparse: reading it would take a while
    with pytest.raises(Rejected, match=r"10737418240 bytes is too large; the limit is 131072"):
        spool.read(path, DESTS)


# -- waiting and claim -------------------------------------------------------------------------


def test_waiting_lists_the_oldest_first_and_at_most_the_limit(spool: Spool) -> None:
    for i, name in enumerate(["c.json", "a.json", "d.json", "b.json"]):
        drop(spool, name, as_json(), mtime=1_700_000_000 + [30, 10, 40, 20][i])
    assert [p.name for p in spool.waiting(10)] == ["a.json", "b.json", "c.json", "d.json"]
    assert [p.name for p in spool.waiting(2)] == ["a.json", "b.json"]


def test_files_being_written_wait_until_renamed(spool: Spool) -> None:
    drop(spool, ".partial.json", as_json())
    drop(spool, "upload.json.tmp", as_json())
    assert spool.waiting(10) == []
    incoming = spool.dirs["incoming"]
    (incoming / ".partial.json").rename(incoming / "partial.json")
    (incoming / "upload.json.tmp").rename(incoming / "upload.json")
    assert sorted(p.name for p in spool.waiting(10)) == ["partial.json", "upload.json"]


def test_claim_moves_the_file_and_yields_none_when_it_vanished(spool: Spool) -> None:
    path = drop(spool, "a.json", as_json())
    (listed,) = spool.waiting(10)
    path.unlink()  # another daemon, or the writer, took it meanwhile
    assert spool.claim(listed) is None
    path = drop(spool, "a.json", as_json())
    claimed = spool.claim(path)
    assert claimed == spool.dirs["processing"] / "a.json"
    assert claimed.read_bytes() == as_json()
    assert not path.exists()


def test_claim_is_atomic_when_daemons_race(tmp_path: Path) -> None:
    spools = [Spool(tmp_path / "spool", max_bytes=MAX_JOB_FILE_BYTES) for _ in range(8)]
    spools[0].ensure()
    names = [f"job-{i:03}.json" for i in range(200)]
    for name in names:
        drop(spools[0], name, as_json(id=name.removesuffix(".json")))
    listed = threading.Barrier(len(spools))
    won: list[list[Path]] = [[] for _ in spools]
    lost = [0 for _ in spools]

    def race(i: int) -> None:
        paths = spools[i].waiting(len(names))
        listed.wait()  # every daemon has seen every file before any claims one
        for path in paths:
            claimed = spools[i].claim(path)
            if claimed is None:
                lost[i] += 1
            else:
                won[i].append(claimed)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(spools))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    claimed = [p for paths in won for p in paths]
    assert len(claimed) == len(names)  # every file claimed exactly once
    processing = spools[0].processing()
    assert sorted(p.name for p in processing) == names  # none renamed to a .2 twin
    assert len({p.read_bytes() for p in processing}) == len(names)
    # every file was contested by all eight, whichever thread the scheduler ran first
    assert sum(lost) == len(names) * (len(spools) - 1)


def test_a_claim_never_overwrites_a_file_in_processing(spool: Spool) -> None:
    (spool.dirs["processing"] / "a.json").write_bytes(b"the first one")
    claimed = spool.claim(drop(spool, "a.json", as_json()))
    assert claimed == spool.dirs["processing"] / "a.2.json"
    assert (spool.dirs["processing"] / "a.json").read_bytes() == b"the first one"


# -- finish ------------------------------------------------------------------------------------


def result_of(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.with_name(path.name + RESULT_SUFFIX).read_text())
    return loaded


def test_finish_stamps_the_result_with_the_spools_clock(tmp_path: Path) -> None:
    clock = FakeClock(start=1_767_225_690.0)  # 2026-01-01T00:01:30Z
    spool = Spool(tmp_path / "spool", max_bytes=MAX_JOB_FILE_BYTES, clock=clock)
    spool.ensure()
    claimed = spool.claim(drop(spool, "a.json", as_json()))
    assert claimed is not None
    target = spool.finish(claimed, outcome())
    assert result_of(target)["finished_at"] == "2026-01-01T00:01:30+00:00"


@pytest.mark.parametrize(
    ("state", "folder"),
    [
        (JobState.SUCCEEDED, "done"),
        (JobState.REJECTED, "rejected"),
        (JobState.FAILED, "failed"),
        (JobState.TIMED_OUT, "failed"),
    ],
)
def test_finish_files_the_job_with_its_result_beside_it(
    spool: Spool, state: JobState, folder: str
) -> None:
    claimed = spool.claim(drop(spool, "a.json", as_json()))
    assert claimed is not None
    target = spool.finish(claimed, outcome(state, "why"))
    assert target == spool.dirs[folder] / "a.json"
    assert target.read_bytes() == as_json()
    assert not claimed.exists()
    result = result_of(target)
    assert (result["state"], result["message"], result["file"], result["job_id"]) == (
        state.value,
        "why",
        "a.json",
        "j1",
    )
    assert sorted(p.name for p in spool.dirs[folder].iterdir()) == ["a.json", "a.json.result.json"]


def test_finish_repeats_safely_after_a_crash_between_its_two_steps(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    claimed = spool.claim(drop(spool, "a.json", as_json()))
    assert claimed is not None

    def crash(self: Path, target: Path) -> Path:
        raise SystemExit("killed after the result was written, before the job moved")

    with monkeypatch.context() as patch:
        patch.setattr(Path, "rename", crash)
        with pytest.raises(SystemExit):
            spool.finish(claimed, outcome(message="first try"))
    rejected = spool.dirs["rejected"]
    assert sorted(p.name for p in rejected.iterdir()) == ["a.json.result.json"]
    assert claimed.exists()

    target = spool.finish(claimed, outcome(message="second try"))  # what recovery does
    assert target == rejected / "a.json"
    assert sorted(p.name for p in rejected.iterdir()) == ["a.json", "a.json.result.json"]
    assert result_of(target)["message"] == "second try"
    assert not claimed.exists()


def test_finish_picks_a_free_name_when_the_name_was_used_before(spool: Spool) -> None:
    for n in range(3):
        claimed = spool.claim(drop(spool, "a.json", as_json(id=f"n{n}")))
        assert claimed is not None
        spool.finish(claimed, outcome(message=f"number {n}"))
    rejected = spool.dirs["rejected"]
    assert sorted(p.name for p in rejected.iterdir()) == [
        "a.2.json",
        "a.2.json.result.json",
        "a.3.json",
        "a.3.json.result.json",
        "a.json",
        "a.json.result.json",
    ]
    for n, name in enumerate(["a.json", "a.2.json", "a.3.json"]):
        assert json.loads((rejected / name).read_bytes())["id"] == f"n{n}"
        assert result_of(rejected / name)["message"] == f"number {n}"


def test_finish_moves_links_and_folders_without_following_them(
    spool: Spool, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.json"
    outside.write_bytes(as_json())
    (spool.dirs["processing"] / "link.json").symlink_to(outside)
    (spool.dirs["processing"] / "dir.json").mkdir()
    for name in ("link.json", "dir.json"):
        spool.finish(spool.dirs["processing"] / name, outcome())
    assert (spool.dirs["rejected"] / "link.json").readlink() == outside
    assert (spool.dirs["rejected"] / "dir.json").is_dir()
    assert outside.read_bytes() == as_json()
    assert spool.processing() == []
