"""The Redis store's Lua scripts: package files beside the module, loaded and compiled by a
real redis-server (tests/redis_support.py)."""

from __future__ import annotations

import random
from pathlib import Path

from exporter.clock import SystemClock
from exporter.daemon.config import RedisConfig
from exporter.sources.redis import store
from exporter.sources.redis.store import RedisStore, lua
from tests.redis_support import (
    RedisServer,
    redis_server_fixture,  # noqa: F401 - the `redis_server` fixture
)

SCRIPTS = ("claim", "keep", "restore", "settle", "dead_letter")


def test_every_lua_file_beside_the_store_is_one_of_its_scripts() -> None:
    beside = {p.stem for p in Path(store.__file__).parent.glob("*.lua")}
    assert beside == set(SCRIPTS)


async def test_each_script_loads_from_its_file_and_redis_compiles_it(
    redis_server: RedisServer,
) -> None:
    redis_store = RedisStore(
        RedisConfig(url=redis_server.url, consumer="c1"), clock=SystemClock(), rng=random.Random()
    )
    try:
        for name in SCRIPTS:
            source = lua(name)
            assert source.startswith("-- KEYS:"), name  # each opens with its calling convention
            registered = getattr(redis_store, f"_{name}")
            assert registered.script == source
            # SCRIPT LOAD compiles the script (a syntax error is refused) and answers its SHA1,
            # the one the store calls it by (EVALSHA).
            assert await redis_server.client.script_load(source) == registered.sha
    finally:
        await redis_store.close()
