"""A deterministic simulator that runs many nodes of the real Raft core in one process."""
