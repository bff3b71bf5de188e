"""Kept so that `from kvstore.config import ServeConfig` still works; the module moved.

The node's configuration belongs to the server (`kvstore/server/config.py`), beside the
discovery it reads; here it sat above `kvstore/server` while importing from it, the one import
that ran upward. The import-direction table in tests/test_architecture.py counts this alias
as part of the server layer. Import from `kvstore.server.config` in new code.
"""

from __future__ import annotations

from kvstore.server.config import (
    ServeConfig,
    add_arguments,
    load_config,
    option_names,
    parse_peers,
)

__all__ = ["ServeConfig", "add_arguments", "load_config", "option_names", "parse_peers"]
