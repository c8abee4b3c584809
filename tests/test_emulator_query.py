from __future__ import annotations

from typing import Any

import pytest
from yarl import URL

from aep_emulator.query import QueryError, parse_list_query

Pairs = list[tuple[str, str]]


def entity(eid: str, created: int, **fields: Any) -> dict[str, Any]:
    return {"id": eid, "createdAt": created, **fields}


FLOWS = [
    entity(
        "f1",
        1000,
        name="alpha",
        state="enabled",
        flowSpec={"id": "spec-a"},
        sourceConnectionIds=["s1", "s2"],
        inheritedAttributes={
            "properties": {"isDestinationFlow": True},
            "targetConnections": [{"connectionSpec": {"id": "dlz"}}],
        },
        metrics={"statusSummary": {"status": "failed"}, "durationSummary": {"startedAtUTC": 50}},
        description="first",
    ),
    entity(
        "f2",
        2000,
        name="beta",
        state="disabled",
        flowSpec={"id": "spec-b"},
        sourceConnectionIds=["s3"],
        inheritedAttributes={
            "properties": {"isDestinationFlow": False},
            "targetConnections": [{"connectionSpec": {"id": "s3"}}, {"connectionSpec": {}}],
        },
        metrics={"statusSummary": {"status": "success"}, "durationSummary": {"startedAtUTC": 150}},
        version="9",
    ),
    entity(
        "f3",
        3000,
        name="Gamma",
        state="enabled",
        flowSpec={"id": "spec-a"},
        sourceConnectionIds=[],
        metrics={"statusSummary": {"status": "Failed"}},
        version="10",
        description=None,
    ),
]


def ids(*params: tuple[str, str], entities: list[dict[str, Any]] = FLOWS) -> list[str]:
    body = parse_list_query(list(params)).apply(entities, base_path="/flows")
    return [item["id"] for item in body["items"]]


def error(*params: tuple[str, str]) -> QueryError:
    with pytest.raises(QueryError) as caught:
        parse_list_query(list(params))
    assert caught.value.status == 400
    return caught.value


def prop(expr: str) -> tuple[str, str]:
    return ("property", expr)


# --- filters -------------------------------------------------------------------------------------


def test_no_filter_returns_everything_newest_first() -> None:
    assert ids() == ["f3", "f2", "f1"]


def test_equality_is_exact_and_case_sensitive() -> None:
    assert ids(prop("state==enabled")) == ["f3", "f1"]
    assert ids(prop("name==gamma")) == []
    assert ids(prop("metrics.statusSummary.status==Failed")) == ["f3"]


def test_comma_separated_values_are_ored() -> None:
    assert ids(prop("id==f1,f3,nope")) == ["f3", "f1"]


def test_not_equal_means_none_of_and_matches_missing_fields() -> None:
    assert ids(prop("name!=alpha,beta")) == ["f3"]
    assert ids(prop("description!=first")) == ["f3", "f2"]


def test_several_property_params_are_anded() -> None:
    assert ids(prop("state==enabled"), prop("flowSpec.id==spec-a"), prop("name!=alpha")) == ["f3"]


def test_nested_paths_and_booleans() -> None:
    assert ids(prop("flowSpec.id==spec-b")) == ["f2"]
    assert ids(prop("inheritedAttributes.properties.isDestinationFlow==true")) == ["f1"]
    assert ids(prop("inheritedAttributes.properties.isDestinationFlow==false")) == ["f2"]
    assert ids(prop("name.deeper==x")) == []


def test_array_segments_match_any_element() -> None:
    assert ids(prop("sourceConnectionIds[]==s2,s3")) == ["f2", "f1"]
    assert ids(prop("inheritedAttributes.targetConnections[].connectionSpec.id==dlz")) == ["f1"]
    assert ids(prop("sourceConnectionIds[]!=s1")) == ["f3", "f2"]
    # Without [] the array itself is compared, which never equals a scalar.
    assert ids(prop("sourceConnectionIds==s1")) == []
    assert ids(prop("name[]==alpha")) == []


def test_numbers_compare_numerically() -> None:
    assert ids(prop("createdAt>1000")) == ["f3", "f2"]
    assert ids(prop("createdAt>=1000"), prop("createdAt<3000")) == ["f2", "f1"]
    assert ids(prop("createdAt<=1000")) == ["f1"]
    assert ids(prop("createdAt==2000.0")) == ["f2"]
    assert ids(prop("metrics.durationSummary.startedAtUTC>100")) == ["f2"]
    # Numeric strings compare as numbers too: "10" > "9" although "10" < "9" as text.
    assert ids(prop("version>9")) == ["f3"]


def test_booleans_and_numbers_never_equal_each_other() -> None:
    mixed = [entity("t", 1, v=True), entity("one", 2, v=1), entity("s", 3, v="true")]
    assert ids(prop("v==1"), entities=mixed) == ["one"]
    assert ids(prop("v==true"), entities=mixed) == ["s", "t"]


def test_non_numeric_range_compares_text() -> None:
    assert ids(prop("name>b")) == ["f2"]  # "Gamma" < "b": case-sensitive byte order
    assert ids(prop("createdAt>abc")) == []
    assert ids(prop("inheritedAttributes.properties.isDestinationFlow>0")) == []
    assert ids(prop("flowSpec>a")) == []


def test_bare_field_means_exists_and_bang_means_absent() -> None:
    assert ids(prop("description")) == ["f3", "f1"]  # present even when null
    assert ids(prop("!description")) == ["f2"]
    assert ids(prop("metrics.durationSummary")) == ["f2", "f1"]
    assert ids(prop("sourceConnectionIds[]")) == ["f2", "f1"]
    assert ids(prop("!inheritedAttributes.targetConnections[].connectionSpec.id")) == ["f3"]


@pytest.mark.parametrize(
    ("expr", "code"),
    [
        ("name~^Sample", 1440),
        ("name=~x", 1440),
        ("createdAt!>5", 1450),
        ("state=enabled", 1450),
        ("state===enabled", 1450),
        ("createdAt<=1,2", 1443),
        ("id>=abc", 1448),
        ("==enabled", 1449),
        ("flow..id==x", 1449),
        ("flow id==x", 1449),
        ("state==", 1453),
        ("id==a,,b", 1453),
    ],
)
def test_bad_filters_are_rejected_with_flow_service_codes(expr: str, code: int) -> None:
    assert error(prop(expr)).code == code


def test_unknown_and_repeated_parameters_are_rejected() -> None:
    assert error(("testParam", "1")).code == 1451
    assert error(("limit", "1"), ("limit", "2")).code == 1453


# --- orderby -------------------------------------------------------------------------------------


def test_orderby_defaults_to_ascending_and_accepts_signs() -> None:
    assert ids(("orderby", "name")) == ["f3", "f1", "f2"]
    assert ids(("orderby", "+name")) == ["f3", "f1", "f2"]
    assert ids(("orderby", "-name")) == ["f2", "f1", "f3"]
    assert ids(("orderby", "metrics.durationSummary.startedAtUTC")) == ["f3", "f1", "f2"]


def test_orderby_plus_survives_form_decoding() -> None:
    query = URL("/flows?orderby=+createdAt").query
    assert query["orderby"] == " createdAt"  # what aiohttp hands the handler
    assert parse_list_query(query).descending is False


def test_ties_are_broken_by_id_in_the_same_direction() -> None:
    same = [entity(i, 5) for i in ("b", "c", "a")]
    assert ids(entities=same) == ["c", "b", "a"]
    assert ids(("orderby", "createdAt"), entities=same) == ["a", "b", "c"]


def test_mixed_types_sort_missing_then_bool_number_text_object() -> None:
    mixed = [
        entity("obj", 0, v={"a": 1}),
        entity("txt", 0, v="a"),
        entity("num", 0, v=2.5),
        entity("bool", 0, v=False),
        entity("none", 0, v=None),
        entity("missing", 0),
    ]
    assert ids(("orderby", "v"), entities=mixed) == ["missing", "none", "bool", "num", "txt", "obj"]


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("*name", 1432),
        ("--name", 1432),
        ("", 1432),
        ("name,createdAt", 1433),
        ("ids[]", 1433),
        ("-a..b", 1433),
    ],
)
def test_bad_orderby(raw: str, code: int) -> None:
    assert error(("orderby", raw)).code == code


def test_orderby_outside_the_sortable_set_is_rejected() -> None:
    with pytest.raises(QueryError) as caught:
        parse_list_query([("orderby", "-secret")], sortable=frozenset({"name", "createdAt"}))
    assert caught.value.code == 1433
    assert parse_list_query([("orderby", "-name")], sortable=frozenset({"name"})).descending


# --- limit and count -----------------------------------------------------------------------------


def test_limit_bounds() -> None:
    assert parse_list_query([]).limit == 100
    assert parse_list_query([("limit", "1")]).limit == 1
    assert parse_list_query([("limit", "100")]).limit == 100
    assert parse_list_query([("limit", "5000")]).limit == 100  # clamped, like AEP's 100 cap
    for bad in ("0", "-1", "abc", "1.5", " 3", ""):
        assert error(("limit", bad)).code == 1453


def test_count_returns_only_the_number_of_matches() -> None:
    query = parse_list_query([prop("state==enabled"), ("count", "true")])
    assert query.apply(FLOWS, base_path="/flows") == {"count": 2}
    assert ids(("count", "false")) == ["f3", "f2", "f1"]
    assert error(("count", "yes")).code == 1453


def test_limit_and_count_together_is_error_1401() -> None:
    err = error(("count", "true"), ("limit", "10"))
    assert err.code == 1401
    assert err.error_type == "https://ns.adobe.com/aep/errors/FLOW-1401-400"
    assert err.message.startswith("The limit and count parameters cannot be given together")
    for true in ("TRUE", "True"):
        assert error(("limit", "10"), ("count", true)).code == 1401


def test_count_false_with_limit_is_a_plain_listing() -> None:
    # aepp sends `count=False` together with `limit` on every list call.
    for false in ("false", "False", "FALSE"):
        query = parse_list_query([("count", false), ("limit", "2")])
        assert not query.count
        assert query.limit == 2
        assert ids(("count", false), ("limit", "2")) == ["f3", "f2"]


# --- paging --------------------------------------------------------------------------------------


def follow(href: str) -> Pairs:
    url = URL(href)
    assert url.path == "/runs"
    return list(url.query.items())


def collect(
    store: list[dict[str, Any]], params: Pairs, on_page: Any = None
) -> tuple[list[str], list[int]]:
    seen: list[str] = []
    sizes: list[int] = []
    while True:
        body = parse_list_query(params).apply(store, base_path="/runs")
        seen += [item["id"] for item in body["items"]]
        sizes.append(len(body["items"]))
        if "_links" not in body:
            return seen, sizes
        if on_page is not None:
            on_page(store)
        params = follow(body["_links"]["next"]["href"])


def test_paging_250_items_yields_each_once_in_order() -> None:
    store = [entity(f"r{i:03}", 10_000 + i, flowId="f") for i in range(250)]
    store.append(entity("other", 99_999, flowId="g"))
    seen, sizes = collect(store, [prop("flowId==f"), ("limit", "100")])
    assert sizes == [100, 100, 50]
    assert seen == [f"r{i:03}" for i in reversed(range(250))]


def test_next_link_carries_token_first_then_the_original_parameters() -> None:
    store = [entity(f"r{i}", i, flowId="f") for i in range(3)]
    params = [prop("flowId==f"), prop("sourceConnectionIds[]!=x"), ("orderby", "+id")]
    body = parse_list_query([*params, ("limit", "2")]).apply(store, base_path="/runs")
    href = body["_links"]["next"]["href"]
    assert href.startswith("/runs?continuationToken=")
    assert "%2Bid" in href
    token = href.split("&")[0].removeprefix("/runs?continuationToken=")
    assert "=" not in token  # no padding: clients that split("=") still get the whole token
    names = [name for name, _ in follow(href)]
    assert names == ["continuationToken", "property", "property", "orderby", "limit"]
    assert follow(href)[1:] == [*params, ("limit", "2")]


def test_paging_is_stable_when_items_are_created_between_pages() -> None:
    store = [entity(f"r{i:03}", 1_000 + i) for i in range(30)]
    created = iter(range(100))

    def insert(store: list[dict[str, Any]]) -> None:
        n = next(created)
        store.append(entity(f"new{n}", 5_000 + n))  # newer than everything
        store.append(entity(f"tie{n}", 1_015))  # same createdAt as a listed item

    seen, _ = collect(store, [("limit", "7")], on_page=insert)
    assert len(seen) == len(set(seen))
    assert [s for s in seen if s.startswith("r")] == [f"r{i:03}" for i in reversed(range(30))]
    assert not any(s.startswith("new") for s in seen)


def test_paging_ascending_by_a_string_field() -> None:
    store = [entity(f"r{i:02}", 0, name=f"n{i % 5}") for i in range(23)]
    seen, sizes = collect(store, [("orderby", "name"), ("limit", "10")])
    assert sizes == [10, 10, 3]
    assert seen == sorted((e["id"] for e in store), key=lambda i: (f"n{int(i[1:]) % 5}", i))


def test_token_alone_keeps_its_order() -> None:
    store = [entity(f"r{i}", i) for i in range(5)]
    body = parse_list_query([("orderby", "createdAt"), ("limit", "2")]).apply(store, base_path="/r")
    token = URL(body["_links"]["next"]["href"]).query["continuationToken"]
    assert ids(("continuationToken", token), entities=store) == ["r2", "r3", "r4"]
    assert error(("continuationToken", token), ("orderby", "-createdAt")).code == 1453


@pytest.mark.parametrize("token", ["garbage", "", "eyJ9", "A" * 40, "%%%"])
def test_garbage_tokens_are_rejected(token: str) -> None:
    assert error(("continuationToken", token)).code == 1453


def test_tampered_tokens_are_rejected() -> None:
    store = [entity(f"r{i}", i) for i in range(5)]
    body = parse_list_query([("limit", "2")]).apply(store, base_path="/r")
    token = URL(body["_links"]["next"]["href"]).query["continuationToken"]
    parse_list_query([("continuationToken", token)])
    for pos in range(len(token)):
        flipped = token[:pos] + ("A" if token[pos] != "A" else "B") + token[pos + 1 :]
        with pytest.raises(QueryError):
            parse_list_query([("continuationToken", flipped)])


# --- id candidates -------------------------------------------------------------------------------


def test_id_candidates() -> None:
    assert parse_list_query([prop("state==enabled")]).id_candidates() is None
    assert parse_list_query([prop("id!=a")]).id_candidates() is None
    assert parse_list_query([prop("id==a,b")]).id_candidates() == frozenset({"a", "b"})
    both = parse_list_query([prop("id==a,b,c"), prop("state==x"), prop("id==b,c,d")])
    assert both.id_candidates() == frozenset({"b", "c"})
    assert parse_list_query([prop("id==a"), prop("id==b")]).id_candidates() == frozenset()


def test_candidates_lookup_gives_the_same_answer_as_a_scan() -> None:
    store = {f"r{i}": entity(f"r{i}", i, state="ok" if i % 2 else "ko") for i in range(50)}
    query = parse_list_query([prop("id==r1,r2,r3,r4,zz"), prop("state==ok")])
    candidates = query.id_candidates()
    assert candidates is not None
    picked = [store[i] for i in candidates if i in store]
    assert query.apply(picked, base_path="/runs") == query.apply(store.values(), base_path="/runs")
    assert query.matches(store["r3"])
    assert not query.matches(store["r2"])
