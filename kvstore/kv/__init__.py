"""The replicated key-value state machine: commands, apply, snapshots, exactly-once sessions."""
