"""The query language of Flow Service list endpoints: `property` filters, `orderby`, `limit`,
`count` and `continuationToken`, after Adobe's "Sorting and filtering responses in the Flow Service
API" (help/dataflows/api/sort-and-filter.md) with error codes from "Flow Service error messages"
(help/sources/errors/flow-service-errors.md).

Where the docs are silent: equality is exact and case-sensitive ("equals exactly"); `!=` with a
list means "none of" and so also matches entities lacking the field; a bare `field` means "exists"
and `!field` "absent" (Catalog's syntax for the same parameter); `limit` above 100 is clamped,
since AEP documents "a maximum of 100 entities" and no error for it; `count` ignores any token;
`count=false` (any case) with `limit` is a plain listing, only `count=true` with `limit` is 1401.

A query is parsed once into a `ListQuery` whose filters are pre-compiled closures, so matching an
entity does no parsing. Paging is keyset-based: the token holds the sort key and id of the last
item served, so entities created or deleted between pages cause neither duplicates nor gaps.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import operator
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from heapq import nlargest, nsmallest
from typing import Any
from urllib.parse import quote, urlencode

from aep_emulator.errors import FlowError

MAX_LIMIT = 100
_PARAMS = frozenset({"property", "orderby", "limit", "count", "continuationToken"})
_FIELD = re.compile(r"[A-Za-z0-9_$@:-]+(\[\])?(\.[A-Za-z0-9_$@:-]+(\[\])?)*")
_SORT_FIELD = re.compile(r"[A-Za-z0-9_$@:-]+(\.[A-Za-z0-9_$@:-]+)*")
_EXPR = re.compile(r"(?P<field>[^=!<>~]*)(?P<op>[=!<>~]+)(?P<value>.*)", re.DOTALL)
_NUMBER = re.compile(r"-?\d+(\.\d+)?([eE][-+]?\d+)?")
_RANGE_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">": operator.gt,
    "<": operator.lt,
    ">=": operator.ge,
    "<=": operator.le,
}
_MISSING: Any = object()
_FIRST = operator.itemgetter(0)

Entity = Mapping[str, Any]
SortKey = tuple[int, Any, str]


class QueryError(FlowError):
    """A list query Flow Service refuses: always 400, `code` from Adobe's catalogue (1440 renders
    as `FLOW-1440-400`), `message` its detailed message. The error middleware renders it."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(400, code, message)


def _number(text: str) -> int | float | None:
    if not _NUMBER.fullmatch(text):
        return None
    return int(text) if text.lstrip("-").isdigit() else float(text)


def _getter(path: str) -> Callable[[Entity], Iterator[Any]]:
    """All values at a dotted path; a segment ending in `[]` fans out over a list's elements."""
    steps = tuple((seg.removesuffix("[]"), seg.endswith("[]")) for seg in path.split("."))

    def values(entity: Entity) -> Iterator[Any]:
        level: list[Any] = [entity]
        for key, fan_out in steps:
            nxt: list[Any] = []
            for node in level:
                if isinstance(node, Mapping) and key in node:
                    value = node[key]
                    if not fan_out:
                        nxt.append(value)
                    elif isinstance(value, list):
                        nxt.extend(value)
            level = nxt
        return iter(level)

    return values


def _scalar(path: str) -> Callable[[Entity], Any]:
    first, *rest = path.split(".")
    if not rest:
        return lambda entity: entity.get(first, _MISSING)

    def value(entity: Entity) -> Any:
        node = entity.get(first, _MISSING)
        for key in rest:
            if not isinstance(node, dict):
                return _MISSING
            node = node.get(key, _MISSING)
        return node

    return value


def _equals(raw: list[str]) -> Callable[[Any], bool]:
    strs = frozenset(raw)
    bools = frozenset(v == "true" for v in raw if v in ("true", "false"))
    # Parsed on first use: an `id==<100 ids>` filter only ever meets strings.
    nums: frozenset[int | float] | None = None

    def test(value: Any) -> bool:
        nonlocal nums
        if value.__class__ is str:
            return value in strs
        if value is True or value is False:
            return value in bools
        if not isinstance(value, (int, float)):
            return False
        if nums is None:
            nums = frozenset(n for n in map(_number, raw) if n is not None)
        return value in nums

    return test


def _compare(op: str, raw: str) -> Callable[[Any], bool]:
    num, cmp = _number(raw), _RANGE_OPS[op]

    def test(value: Any) -> bool:
        if value is True or value is False or value is None or value is _MISSING:
            return False
        if isinstance(value, (int, float)):
            return num is not None and cmp(value, num)
        if isinstance(value, str):
            # Timestamps and counts sometimes arrive as strings; compare those as numbers too.
            other = _number(value) if num is not None else None
            return cmp(other, num) if other is not None else cmp(value, raw)
        return False

    return test


def _present(value: Any) -> bool:
    return value is not _MISSING


def _over_path(path: str, test: Callable[[Any], bool], negate: bool) -> Callable[[Entity], bool]:
    if "[]" in path:
        values_at = _getter(path)

        def positive(entity: Entity) -> bool:
            return any(map(test, values_at(entity)))

    elif "." not in path:  # the common case, one call less per entity

        def positive(entity: Entity) -> bool:
            return test(entity.get(path, _MISSING))

    else:
        value_at = _scalar(path)

        def positive(entity: Entity) -> bool:
            return test(value_at(entity))

    if not negate:
        return positive

    def negative(entity: Entity) -> bool:
        return not positive(entity)

    return negative


def _compile_filter(
    expr: str,
) -> tuple[Callable[[Entity], bool], tuple[str, frozenset[str]] | None]:
    """One `property` expression as a predicate, plus its field and values when it is
    `field==a,b` (only entities with one of those values can match)."""
    match = _EXPR.fullmatch(expr)
    equals = None
    test: Callable[[Any], bool]
    if match is None or (match["op"] == "!" and not match["field"]):
        # A bare `field` asks for existence, `!field` for absence (Catalog's documented syntax).
        path, negate, test = expr.removeprefix("!"), expr.startswith("!"), _present
    else:
        path, op, value = match["field"], match["op"], match["value"]
        if "~" in op:
            raise QueryError(1440, f"Operator '{op}' not implemented.")
        if op not in _RANGE_OPS and op not in ("==", "!="):
            raise QueryError(1450, f"Invalid operator {op} in filter params.")
        values = value.split(",")
        if not value or "" in values:
            raise QueryError(1453, f"Invalid query value {expr} provided in query param.")
        if op in _RANGE_OPS:
            if len(values) > 1:
                raise QueryError(1443, f"Operator '{op}' is not allowed for multiple values.")
            if path == "id":
                raise QueryError(1448, f"Operator {op} not supported for field id.")
            negate, test = False, _compare(op, value)
        else:
            negate, test = op == "!=", _equals(values)
            equals = (path, frozenset(values)) if op == "==" else None
    if not _FIELD.fullmatch(path):
        raise QueryError(1449, f"Invalid field {path} in filter params.")
    return _over_path(path, test, negate), equals


def _sort_value(value: Any) -> tuple[int, Any]:
    # Rank by JSON type first so that mixed or missing values still have a total order.
    if value is None or value is _MISSING:
        return (0, 0)
    if value is True or value is False:
        return (1, int(value))
    if isinstance(value, (int, float)):
        return (2, value)
    if isinstance(value, str):
        return (3, value)
    return (4, json.dumps(value, sort_keys=True, default=str))


def _parse_orderby(raw: str, sortable: frozenset[str] | None) -> tuple[str, bool]:
    # Form decoding turns an unescaped "+" into a space, so a leading space means "+".
    descending = raw.startswith("-")
    name = raw[1:] if raw[:1] in ("+", "-", " ") else raw
    if not name or name[0] in "+- " or not (name[0].isalnum() or name[0] in "_$@"):
        raise QueryError(
            1432,
            "Sort order specified is not correct, prepend + for ascending order and - for "
            "descending order in the fieldName.",
        )
    if not _SORT_FIELD.fullmatch(name) or (sortable is not None and name not in sortable):
        raise QueryError(
            1433, f"Incorrect field= {name} passed in orderBy, example are +name, -name, name."
        )
    return name, descending


def _checksum(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=6, person=b"aep-query").digest()


def _encode_token(sort: tuple[str, bool], key: SortKey) -> str:
    payload = json.dumps([1, sort[0], sort[1], *key], separators=(",", ":")).encode()
    # No "=" padding: some clients (aepp) cut the token out of the href with split("=").
    return base64.urlsafe_b64encode(_checksum(payload) + payload).decode().rstrip("=")


def _decode_token(token: str) -> tuple[tuple[str, bool], SortKey]:
    try:
        blob = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        check, payload = blob[:6], blob[6:]
        version, name, desc, rank, value, last_id = json.loads(payload)
        expected = {0: (int,), 1: (int,), 2: (int, float), 3: (str,), 4: (str,)}[rank]
        valid = (
            check == _checksum(payload)
            and rank.__class__ is int
            and version == 1
            and isinstance(name, str)
            and isinstance(desc, bool)
            and isinstance(last_id, str)
            and isinstance(value, expected)
            and not isinstance(value, bool)
        )
    except (binascii.Error, ValueError, TypeError, KeyError, UnicodeDecodeError, RecursionError):
        valid = False
    if not valid:
        raise QueryError(
            1453, f"Invalid query value continuationToken={token} provided in query param."
        )
    return (name, desc), (rank, value, last_id)


@dataclass(frozen=True)
class ListQuery:
    """One list request, parsed and compiled by `parse_list_query`; immutable and cheap to apply."""

    sort_field: str = "createdAt"
    descending: bool = True
    limit: int = MAX_LIMIT
    count: bool = False
    after: SortKey | None = None
    params: tuple[tuple[str, str], ...] = ()
    filters: tuple[Callable[[Entity], bool], ...] = field(default=(), repr=False)
    equals: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """Per field, the only values that can match (the intersection of its `==` filters)."""

    def candidates(self, path: str) -> frozenset[str] | None:
        """The only values of `path` that can match, or None when no `path==` filter narrows
        the query. Lets callers look entities up by id or by an index instead of scanning."""
        return self.equals.get(path)

    def id_candidates(self) -> frozenset[str] | None:
        """The only ids that can match (see `candidates`)."""
        return self.candidates("id")

    def matches(self, entity: Entity) -> bool:
        """Whether the entity passes every `property` filter."""
        for passes in self.filters:  # noqa: SIM110 - a plain loop: no generator on the hot path
            if not passes(entity):
                return False
        return True

    def apply(self, entities: Iterable[Entity], *, base_path: str) -> dict[str, Any]:
        """The response body for these stored entities: `{"count": n}` for `count=true`, else
        one page `{"items": [...]}` plus `_links.next.href` (`base_path?continuationToken=...`
        and the request's other parameters) when more items follow."""
        if self.count:
            return {"count": sum(1 for e in entities if self.matches(e))}
        value_at, after, desc = _scalar(self.sort_field), self.after, self.descending

        def key(entity: Entity) -> SortKey:
            value = value_at(entity)
            kind = value.__class__  # numbers and text inline; _sort_value ranks the rest
            if kind is int or kind is float:
                return 2, value, str(entity.get("id", ""))
            if kind is str:
                return 3, value, str(entity.get("id", ""))
            rank, value = _sort_value(value)
            return rank, value, str(entity.get("id", ""))

        # A single filter is called directly: no loop over one predicate per entity.
        matches = self.filters[0] if len(self.filters) == 1 else self.matches
        keyed = [(key(e), e) for e in entities if matches(e)]
        if after is not None:
            keyed = [(k, e) for k, e in keyed if (k < after if desc else k > after)]
        pick = nlargest if desc else nsmallest
        # One extra item tells whether another page exists without sorting everything; given
        # a list no longer than that, heapq sorts it outright.
        page = pick(self.limit + 1, keyed, key=_FIRST)
        body: dict[str, Any] = {"items": [e for _, e in page[: self.limit]]}
        if len(page) > self.limit:
            token = _encode_token((self.sort_field, desc), page[self.limit - 1][0])
            query = urlencode(
                [("continuationToken", token), *self.params], quote_via=quote, safe="=,!"
            )
            body["_links"] = {"next": {"href": f"{base_path}?{query}"}}
        return body


def parse_list_query(
    params: Mapping[str, str] | Iterable[tuple[str, str]],
    *,
    sortable: frozenset[str] | None = None,
) -> ListQuery:
    """Parse a list request's query (aiohttp's `request.query`, or `(name, value)` pairs; names
    may repeat). `sortable` restricts `orderby` fields. Raises `QueryError` on any input Flow
    Service would reject; `limit` above 100 is clamped to 100."""
    pairs = list(params.items() if isinstance(params, Mapping) else params)
    single: dict[str, str] = {}
    exprs: list[str] = []
    for name, value in pairs:
        if name not in _PARAMS:
            raise QueryError(1451, f"Invalid params {name} provided in query params.")
        if name == "property":
            exprs.append(value)
        elif name in single:
            raise QueryError(1453, f"Invalid query value {name}={value} provided in query param.")
        else:
            single[name] = value
    # aepp sends `count=False` with `limit` on every list call: only a true count conflicts.
    if "limit" in single and single.get("count", "").lower() == "true":
        raise QueryError(
            1401,
            "The limit and count parameters cannot be given together in the same request. "
            "Please provide either only the limit or the count parameter and try again.",
        )
    limit = MAX_LIMIT
    if "limit" in single:
        raw = single["limit"]
        if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
            raise QueryError(1453, f"Invalid query value limit={raw} provided in query param.")
        limit = min(int(raw), MAX_LIMIT)
    count_raw = single.get("count", "false")
    if count_raw.lower() not in ("true", "false"):
        raise QueryError(1453, f"Invalid query value count={count_raw} provided in query param.")
    sort = ("createdAt", True)
    if "orderby" in single:
        sort = _parse_orderby(single["orderby"], sortable)
    after = None
    if "continuationToken" in single:
        token_sort, after = _decode_token(single["continuationToken"])
        if "orderby" in single and token_sort != sort:
            raise QueryError(
                1453, "Invalid query value continuationToken: it belongs to another orderby."
            )
        sort = token_sort
    filters: list[Callable[[Entity], bool]] = []
    equals: dict[str, frozenset[str]] = {}
    for expr in exprs:
        passes, narrows = _compile_filter(expr)
        filters.append(passes)
        if narrows is not None:
            path, values = narrows
            equals[path] = values if path not in equals else equals[path] & values
    return ListQuery(
        sort_field=sort[0],
        descending=sort[1],
        limit=limit,
        count=count_raw.lower() == "true",
        after=after,
        params=tuple((n, v) for n, v in pairs if n != "continuationToken"),
        filters=tuple(filters),
        equals=equals,
    )
