"""The latency model (paper eqs. 4–6) and the measured books."""

from __future__ import annotations

import pytest

from personalization.latency import PROFILES, Books, profile, t_net, t_total


def test_t_net_is_round_trips_plus_transfer():
    net = profile("3g")  # 300 ms RTT, 1.6 Mbit/s down, 0.768 Mbit/s up
    expected = 5 * 0.300 + 8 * 200_000 / 1.6e6 + 8 * 9_600 / 0.768e6
    assert t_net(5, 200_000, 9_600, net) == pytest.approx(expected)
    assert t_net(0, 0, 0, net) == 0.0


def test_t_total_is_the_sum_of_parts():
    assert t_total(0.5, 2.0, 0.25) == 2.75
    books = Books(tokens=10, steps=10, contacts=4, t_cloud=2.0, t_device=0.5, t_net=0.25)
    assert books.t_total == 2.75 and books.m == 0.4
    assert books.summary()["M"] == 0.4 and books.summary()["t_total"] == 2.75
    assert Books().m == 0.0


def test_profiles_are_ordered_by_latency_and_named():
    rtts = [p.rtt_s for p in PROFILES.values()]
    assert rtts == sorted(rtts)
    assert all(p.source for p in PROFILES.values())
    with pytest.raises(ValueError, match="unknown network profile 'dialup'"):
        profile("dialup")
