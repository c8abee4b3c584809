"""Flow Service list queries from the client's side: filters that survive the filter
language's syntax, paging through continuation links, and concurrent batches.

The language (`property=field<op>value`) splits values on commas (`id==a,b` is "a or b") and
reads a leading `=`, `!`, `<`, `>` or `~` of a value as part of the operator, so values with
those cannot be asked for exactly; `name_filters` narrows such names by a prefix range, and the
caller compares names exactly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

from yarl import URL

from exporter.aep.facts import FLOW_SERVICE_PATH
from exporter.aep.transport import Transport
from exporter.errors import ServerError

T = TypeVar("T")
MAX_IDS_PER_QUERY = 100
MAX_PAGES = 10_000
_OPERATOR_CHARS = frozenset("=!<>~")


def filterable(value: str) -> bool:
    """Whether `field==value` asks for exactly `value`."""
    return bool(value) and "," not in value and value[0] not in _OPERATOR_CHARS


def name_filters(name: str) -> list[tuple[str, str]]:
    """`property` filters selecting at least every entity named `name` (fewer is a bug, more
    is fine): an exact match where the language allows it, else the names starting with the
    part before the first comma, else (no usable prefix) every named entity."""
    if filterable(name):
        return [("property", f"name=={name}")]
    prefix = name.split(",", 1)[0]
    if filterable(prefix):
        return [("property", f"name>={prefix}"), ("property", f"name<={prefix}\U0010ffff")]
    return [("property", "name")]


def id_batches(ids: Sequence[str]) -> list[list[str]]:
    """Distinct filterable ids, in batches one `id==a,b,...` filter can carry."""
    wanted = list(dict.fromkeys(i for i in ids if filterable(i)))
    return [wanted[i : i + MAX_IDS_PER_QUERY] for i in range(0, len(wanted), MAX_IDS_PER_QUERY)]


def segment(entity_id: str) -> str:
    """An id as one URL path segment."""
    if not entity_id:
        raise ValueError("an entity id must not be empty")
    return quote(entity_id, safe="")


def next_target(href: str) -> str:
    """A `_links.next.href` as a platform path; AEP's are relative to Flow Service."""
    url = URL(href)
    path = url.raw_path
    if not path.startswith("/data/"):
        path = f"{FLOW_SERVICE_PATH}/{path.lstrip('/')}"
    return f"{path}?{url.raw_query_string}" if url.raw_query_string else path


async def gather_all(aws: Sequence[Awaitable[T]]) -> list[T]:
    """All results in order, or the first error with the rest cancelled (no ExceptionGroup:
    callers catch `AepError`s)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def pages(
    transport: Transport,
    target: str,
    query: Sequence[tuple[str, str]],
    operation: str,
    page_size: int = 100,
) -> AsyncIterator[list[dict[str, Any]]]:
    """The `items` of a list call, page by page, following `_links.next` to the end."""
    seen: set[str] = set()
    params = [*query, ("limit", str(page_size))]
    for _ in range(MAX_PAGES):
        answer = await transport.request("GET", target, operation=operation, query=params)
        body = answer.body if isinstance(answer.body, Mapping) else {}
        yield [i for i in body.get("items") or () if isinstance(i, dict)]
        href = ((body.get("_links") or {}).get("next") or {}).get("href")
        if not isinstance(href, str) or not href:
            return
        target, params = next_target(href), []
        if target in seen:
            raise ServerError(f"AEP's paging repeats {target}", operation=operation)
        seen.add(target)
    raise ServerError(f"more than {MAX_PAGES} pages", operation=operation)
