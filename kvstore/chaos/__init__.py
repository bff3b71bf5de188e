"""Chaos drills: real node processes under faults (kill, pause, partitions, disk damage)."""
