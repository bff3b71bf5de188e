"""Durable storage: write-ahead log, hard state and snapshot files; synchronous, no asyncio."""
