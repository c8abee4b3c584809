"""The Redis Streams source: intake and its store."""
