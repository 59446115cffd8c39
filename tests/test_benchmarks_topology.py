"""The topology and failover-loss benchmarks' arithmetic (pure logic; the benchmarks themselves
run in CI as ``python -m benchmarks.topology --preset ci``, and nothing here times anything)."""

from __future__ import annotations

from typing import Any

from benchmarks.common import summarize
from benchmarks.failover_loss import table
from benchmarks.topology import _merge, _ratios


def _trial(kind: str, level: str, lost: int, first_ack: float | None) -> dict[str, Any]:
    return {"topology": kind, "durability": level, "acked": 100, "acked_before_kill": 40,
            "in_flight_at_kill_acked": 8, "lost": lost, "appended_but_not_acked": 0,
            "duplicates": 0, "failed": {"DurabilityNotReached": 1} if lost else {},
            "first_ack_after_kill_s": first_ack, "serving_s": 2.0}


def test_the_loss_table_sums_trials_per_topology_and_level() -> None:
    rows = table([_trial("sentinel", "none", 0, 2.1), _trial("sentinel", "none", 7, 2.4),
                  _trial("sentinel", "none", 0, 2.2), _trial("single", "replicated", 0, None)])
    by_cell = {(r["topology"], r["durability"]): r for r in rows}
    sentinel = by_cell["sentinel", "none"]
    assert (sentinel["trials"], sentinel["acked"], sentinel["lost"]) == (3, 300, 7)
    assert sentinel["failed"] == {"DurabilityNotReached": 1}
    assert sentinel["first_ack_after_kill_s"] == "2.20 (2.10-2.40)"
    assert by_cell["single", "replicated"]["first_ack_after_kill_s"] == "never"


def test_blocks_merge_into_one_summary_and_ratios_are_to_the_single_server() -> None:
    merged = _merge([summarize([1000] * 99 + [9000]), summarize([2000] * 100)])
    assert merged["count"] == 200
    assert merged["max_us"] == 9000
    assert 1000 <= merged["p50_us"] <= 2002
    single = {"fanout_latency": {"p50_us": 1000, "p99_us": 4000},
              "throughput": {"none": {"per_s": 4000.0, "latency": {"p99_us": 10_000}}}}
    cluster = {"fanout_latency": {"p50_us": 1500, "p99_us": 4000},
               "throughput": {"none": {"per_s": 3000.0, "latency": {"p99_us": 20_000}}}}
    assert _ratios(cluster, single) == {"fanout_p50": 1.5, "fanout_p99": 1.0,
                                        "publish_per_s": 0.75, "publish_p99": 2.0}
