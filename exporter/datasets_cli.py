"""`aep-exporter datasets list`: the datasets AEP lets this sandbox export, with ids and names.

AEP lists them at `GET /connectionSpecs/{data lake source spec}/configs` with
`outputType=activationDatasets` and `outputField=datasets`, paged by `start` and `limit`
(at most 100), `pageInfo.hasNext` saying when to stop (Adobe's export guide,
https://experienceleague.adobe.com/en/docs/experience-platform/destinations/api/export-datasets,
"Retrieve a list of available datasets"; docs/aep-notes.md).

Exit codes: 0 listed (an empty list too), 1 AEP refused or could not be reached, 2 bad
configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from exporter.aep.facts import DATALAKE_SOURCE_SPEC_ID, FLOW_SERVICE_PATH
from exporter.aep.transport import Transport
from exporter.errors import AepError, ServerError

if TYPE_CHECKING:
    from exporter.settings import Settings

EXIT_LISTED, EXIT_AEP, EXIT_CONFIG = 0, 1, 2
PAGE = 100
MAX_PAGES = 10_000  # a million datasets: a server that never says "no next page" stops here
CONFIGS_PATH = f"{FLOW_SERVICE_PATH}/connectionSpecs/{DATALAKE_SOURCE_SPEC_ID}/configs"


@dataclass(frozen=True, slots=True)
class Dataset:
    """An exportable dataset as AEP lists it."""

    id: str
    name: str


async def exportable_datasets(transport: Transport) -> list[Dataset]:
    """Every dataset of the sandbox that AEP lets a dataset export read, in AEP's order."""
    found: list[Dataset] = []
    start = 0
    for _ in range(MAX_PAGES):
        answer = await transport.request(
            "GET",
            CONFIGS_PATH,
            operation="connectionSpecs.configs",
            query=[
                ("outputType", "activationDatasets"),
                ("outputField", "datasets"),
                ("start", str(start)),
                ("limit", str(PAGE)),
                ("properties", "name"),
            ],
        )
        body = answer.body if isinstance(answer.body, Mapping) else {}
        items = [i for i in body.get("items") or () if isinstance(i, Mapping) and i.get("id")]
        found.extend(Dataset(str(i["id"]), str(i.get("name") or "")) for i in items)
        info = body.get("pageInfo")
        if not items or not (isinstance(info, Mapping) and info.get("hasNext")):
            return found
        start += len(items)
    raise ServerError(
        f"more than {MAX_PAGES} pages of datasets", operation="connectionSpecs.configs"
    )


def matching(datasets: list[Dataset], search: str | None) -> list[Dataset]:
    """The datasets whose name or id contains `search`, case-insensitively (all without)."""
    if not search:
        return datasets
    needle = search.casefold()
    return [d for d in datasets if needle in d.name.casefold() or needle in d.id.casefold()]


def add_parser(subparsers: Any) -> None:
    from exporter.settings import add_config_argument

    group: argparse.ArgumentParser = subparsers.add_parser(
        "datasets",
        help="list the datasets AEP lets this sandbox export (`datasets list`)",
        description="Ask AEP which datasets of the configured sandbox can be exported.",
    )
    verbs = group.add_subparsers(dest="verb", required=True, metavar="VERB")
    listing: argparse.ArgumentParser = verbs.add_parser(
        "list",
        help="the exportable datasets with their ids and names",
        description="The datasets AEP lets this sandbox export, with their ids and names. "
        "Exit codes: 0 listed, 1 AEP refused or could not be reached, 2 bad configuration.",
    )
    listing.add_argument(
        "--search", metavar="TEXT", help="only datasets whose name or id contains TEXT"
    )
    listing.add_argument("--json", action="store_true", help="print a JSON list on stdout")
    add_config_argument(listing)
    listing.set_defaults(func=run_list)


def run_list(args: argparse.Namespace) -> int:
    from rich.console import Console

    from exporter.oneshot import settings_or_report

    err = Console(stderr=True, soft_wrap=True)
    settings = settings_or_report(args, err)
    if settings is None:
        return EXIT_CONFIG
    try:
        datasets = asyncio.run(_list(settings))
    except AepError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False)
        return EXIT_AEP
    shown = matching(datasets, args.search)
    if args.json:
        print(json.dumps([{"id": d.id, "name": d.name} for d in shown]))
        return EXIT_LISTED
    width = max((len(d.id) for d in shown), default=2)
    for dataset in shown:
        print(f"{dataset.id:<{width}}  {dataset.name}")
    total = f"{len(shown)} of {len(datasets)}" if args.search else str(len(datasets))
    err.print(
        f"{total} exportable dataset(s) in sandbox {settings.aep.sandbox}",
        markup=False,
        highlight=False,
    )
    sys.stdout.flush()
    return EXIT_LISTED


async def _list(settings: Settings) -> list[Dataset]:
    from exporter.aep.client import HttpAep

    async with HttpAep.from_config(settings.aep) as api:
        return await exportable_datasets(api.transport)
