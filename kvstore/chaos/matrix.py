"""The named sets of drills: `smoke` (CI: 20 short runs covering every fault and workload) and `full`
(by hand, `make chaos`: every workload against every fault family, longer runs)."""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.chaos.nemesis import ALL_FAULTS, FAMILIES


@dataclass(frozen=True, slots=True)
class MatrixRun:
    name: str
    workload: str
    faults: str
    duration_s: float
    seed: int


def _smoke() -> tuple[MatrixRun, ...]:
    runs = [MatrixRun(f"register-{fault}", "register", fault, 40.0, 100 + i)
            for i, fault in enumerate(ALL_FAULTS)]  # fmt: skip
    runs.append(MatrixRun("counter-storm", "counter", "kill,pause,partition", 40.0, 200))
    runs.append(MatrixRun("append", "append", "kill,partition,disk", 40.0, 300))
    runs.append(MatrixRun("watch", "watch", "kill,pause,partition", 40.0, 400))
    runs.append(MatrixRun("lock", "lock", "kill,pause,partition", 40.0, 500))
    return tuple(runs)


def _full() -> tuple[MatrixRun, ...]:
    runs: list[MatrixRun] = []
    families = [*FAMILIES, ",".join(FAMILIES)]
    for w, workload in enumerate(("register", "counter", "append", "watch", "lock")):
        for f, faults in enumerate(families):
            label = "all" if "," in faults else faults
            runs.append(MatrixRun(f"{workload}-{label}", workload, faults, 120.0, 1000 * w + f))
    return tuple(runs)


MATRICES: dict[str, tuple[MatrixRun, ...]] = {"smoke": _smoke(), "full": _full()}
