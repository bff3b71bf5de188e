"""The node server: the asyncio driver, peer transport, HTTP API and the CLI to run it."""
