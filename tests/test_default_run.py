"""The default run's closing lines say what was compared and why the winner wins, from the figures."""
from __future__ import annotations

from pipeline.bench.default_cmd import replay_verdict, simulate_verdict


def test_simulate_verdict_names_the_policy_with_fewest_loads_against_belady():
    report = {"belady": {"loads_vram": 100}, "runs": [
        {"policy": "lru", "loads_vram": 150}, {"policy": "nextuse", "loads_vram": 120}, {"policy": "lfu", "loads_vram": 160}]}
    line = simulate_verdict(report)
    assert "nextuse moves 1.20x the experts the offline optimum (Belady) moves, against lru 1.50x, lfu 1.60x" in line
    assert "how soon each is expected back" in line
    report["runs"][0]["loads_vram"] = 110  # LRU wins: no claim about nextuse's ranking
    line = simulate_verdict(report)
    assert line.count("lru moves 1.10x") == 1 and "it moved the fewest experts" in line


def test_replay_verdict_compares_ours_at_the_same_budgets():
    def row(name, tps, nvme):
        return {"method": name, "tokens_per_s": tps, "gb_nvme": nvme}

    report = {"budgets": [{"methods": [row("resident", 300, 0), row("on-demand-disk", 80, 0.09),
                                       row("lru-lookahead", 100, 0.035), row("ours", 120, 0.024)]}]}
    line = replay_verdict(report)
    assert "ours 120 tok/s = 1.50x on-demand from disk and 1.20x LRU with lookahead" in line
    assert "read 24.0 MB from disk against 90.0 and 35.0 MB" in line and "(300 tok/s)" in line
