"""Communication books and the paper's latency model (eqs. 4–6), as pure functions.

T_total = T_device + T_cloud + T_net, with T_net = M·(τ + T_data) per token: each device contact
costs one round trip τ plus the time to move its payload at the profile's bandwidth.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class NetworkProfile:
    """A device's link to the cloud: round-trip time and bandwidth in each direction."""

    name: str
    rtt_s: float  # τ
    down_bps: float  # cloud → device, bits per second
    up_bps: float  # device → cloud
    source: str = ""

    def transfer_s(self, bytes_down: float, bytes_up: float) -> float:
        """T_data: serialisation time of a payload, both directions."""
        return 8 * bytes_down / self.down_bps + 8 * bytes_up / self.up_bps


_WPT = "WebPageTest connectivity profile"
PROFILES: dict[str, NetworkProfile] = {
    p.name: p
    for p in (
        NetworkProfile("datacenter", 0.0005, 10e9, 10e9, "same-region servers (assumed)"),
        NetworkProfile("fiber", 0.004, 20e6, 5e6, f"{_WPT} 'FIOS'"),
        NetworkProfile("cable", 0.028, 5e6, 1e6, f"{_WPT} 'Cable'"),
        NetworkProfile("lte", 0.070, 12e6, 12e6, f"{_WPT} 'LTE'"),
        NetworkProfile("4g", 0.170, 9e6, 9e6, f"{_WPT} '4G'"),
        NetworkProfile("3g", 0.300, 1.6e6, 0.768e6, f"{_WPT} '3G'"),
    )
}


def profile(name: str) -> NetworkProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown network profile {name!r}; choose one of {', '.join(PROFILES)}"
        ) from None


@dataclass
class Books:
    """What one generation cost, measured as it ran."""

    tokens: int = 0  # tokens of the output
    steps: int = 0  # decoding steps (= tokens for greedy and sampling; beam search steps all beams)
    device_tokens: int = 0  # output tokens produced with the device's help
    contacts: int = 0  # device round trips
    tap_positions: int = 0  # positions × rows whose taps crossed to the device
    bytes_to_device: int = 0
    bytes_from_device: int = 0
    t_cloud: float = 0.0  # seconds of backbone (and gate, head) compute
    t_device: float = 0.0  # seconds of side-network compute
    t_net: float = 0.0  # measured network seconds (remote sessions only)

    @property
    def m(self) -> float:
        """M: device round trips per decoding step (per generated token; in beam search one
        round trip serves every beam of a step)."""
        return self.contacts / self.steps if self.steps else 0.0

    @property
    def t_total(self) -> float:
        return self.t_cloud + self.t_device + self.t_net

    def summary(self) -> dict:
        return asdict(self) | {"M": self.m, "t_total": self.t_total}


def t_net(contacts: float, bytes_down: float, bytes_up: float, net: NetworkProfile) -> float:
    """Eq. 6 summed over a generation: every contact pays τ, every byte pays bandwidth."""
    return contacts * net.rtt_s + net.transfer_s(bytes_down, bytes_up)


def t_total(t_device: float, t_cloud: float, t_net_s: float) -> float:
    """Eq. 4."""
    return t_device + t_cloud + t_net_s
