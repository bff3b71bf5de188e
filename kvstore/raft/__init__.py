"""The Raft consensus core: a pure state machine with no I/O (see `kvstore.raft.node`)."""
