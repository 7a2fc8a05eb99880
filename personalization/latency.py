"""Communication books and the paper's latency model (eqs. 4–6), as pure functions.

T_total = T_device + T_cloud + T_net, with T_net = M·(τ + T_data) per token: each device contact
costs one round trip τ plus the time to move its payload at the profile's bandwidth.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from personalization.errors import ConfigError


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
        raise ConfigError(
            f"unknown network profile {name!r}; choose one of {', '.join(PROFILES)}"
        ) from None


def round_trips_per_step(contacts: int, steps: int) -> float:
    """M: device round trips per decoding step — per generated token for greedy and sampling; in
    beam search one round trip serves every beam of a step. The one definition every ledger of
    the project uses (in-process `Books`, the cloud's session totals, the device's accounts)."""
    return contacts / steps if steps else 0.0


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
        return round_trips_per_step(self.contacts, self.steps)

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


@dataclass(frozen=True)
class Measured:
    """What one generation measured, per generated token / per position / per contact."""

    t_cloud: float  # backbone compute per generated token (s)
    t_side: float  # side-network compute per tap position (s)
    tau: float  # round-trip time per device contact (s): the measured one, or the profile's
    usage: float  # share of tokens the gate sends to the device (choice, spa)
    num_layers: int  # L
    hidden_size: int  # H
    wire_bytes: int  # bytes per value of an H-vector on the wire (g(x), a layer's hidden state)
    tap_bytes: float  # bytes per tap position (R rungs) under the session's tap encoding
    backbone_parameters: int
    parameters: dict[str, int]  # trainable parameters per setting
    corrections: float | None = None  # run-ahead corrections per token, where measured


@dataclass(frozen=True)
class WhatIf:
    """One row of the paper's Table 2: the cost of a setting per generated token."""

    setting: str
    parameters_pct: float
    m: float  # transmissions (device round trips) per token
    inference_ms: float  # T_cloud + T_device
    network_ms: float  # T_net = M·τ + bytes / bandwidth
    total_ms: float


#: per setting: contacts per token as a function of (L, usage), and whether taps travel
_CONTACTS = {
    "lora": lambda L, u: L,
    "adapter": lambda L, u: 2 * L,
    "lst": lambda L, u: 1.0,
    "full": lambda L, u: 1.0,
    "choice": lambda L, u: u,
    "spa": lambda L, u: u,
}


def what_if(m: Measured, net: NetworkProfile) -> list[WhatIf]:
    """T_total per token of every device setting under `net`, from measured compute and τ.

    Side settings send every position's taps once (catch-up included; `tap_bytes` of the
    encoding in use) and get one H-vector back per contact; lora / adapter send one H-vector to
    the device and back per contact. Side compute is the measured time per position; the
    in-layer baselines' device compute is scaled from it by their parameter count (FLOPs per
    token ∝ parameters). `base`, the backbone alone, comes first: the cost every setting adds
    to."""
    rows = [WhatIf("base", 0.0, 0.0, 1e3 * m.t_cloud, 0.0, 1e3 * m.t_cloud)]
    per_value = m.hidden_size * m.wire_bytes
    side_params = max(1, m.parameters.get("lst", 1))
    for setting, contacts in _CONTACTS.items():
        k = contacts(m.num_layers, m.usage)
        if setting in ("lora", "adapter"):
            down = up = k * per_value
            t_device = m.t_side * m.parameters[setting] / side_params
        else:
            down, up = m.tap_bytes, k * per_value
            t_device = m.t_side
        network = k * m.tau + net.transfer_s(down, up)
        inference = m.t_cloud + t_device
        rows.append(
            WhatIf(
                setting,
                100 * m.parameters[setting] / m.backbone_parameters,
                k,
                1e3 * inference,
                1e3 * network,
                1e3 * (inference + network),
            )
        )
    rows.append(_run_ahead(m, net))
    return rows


def _run_ahead(m: Measured, net: NetworkProfile) -> WhatIf:
    """`spa` in run-ahead mode: the backbone never waits; the device works beside it on the
    streamed taps and f(x), and only a correction costs a round trip and a redrafted step. Its
    rate c is the measured one, else the usage (every device token a correction: the worst case).
    """
    c = m.usage if m.corrections is None else m.corrections
    down = m.tap_bytes + m.hidden_size * m.wire_bytes  # taps and f(x) per position
    up = c * 64  # a correction is a small JSON body
    inference = m.t_cloud + c * (m.t_cloud + m.t_side)
    network = c * m.tau + net.transfer_s(down, up)
    pct = 100 * m.parameters["spa"] / m.backbone_parameters
    return WhatIf(
        "spa run-ahead", pct, c, 1e3 * inference, 1e3 * network, 1e3 * (inference + network)
    )


def what_if_table(rows: list[WhatIf]) -> str:
    """The rows as Markdown, in the paper's column order."""
    lines = [
        "| setting | % params | inference ms | network ms | total latency ms | transmissions |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.setting} | {r.parameters_pct:.3f} | {r.inference_ms:.1f} | "
            f"{r.network_ms:.1f} | {r.total_ms:.1f} | {r.m:.2f} |"
        )
    return "\n".join(lines)
