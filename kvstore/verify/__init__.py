"""History format and checkers: linearizability, lost writes, exactly-once, cluster invariants."""
