"""The Redis Streams source: intake and its store (with its Lua scripts). It needs the redis
client, the `redis` extra; the daemon imports it only when [redis] is configured."""
