"""Site configuration: YAML files loaded into strict pydantic models.

Every model forbids unknown keys, so a typo is an error rather than a silently ignored setting.
:func:`load_config` turns every problem into a :class:`ConfigError` whose lines name the file,
the key path and what was expected, e.g.::

    configs/site.yaml: miners.3.address: value is not a valid IPv4 address (got '10.0.0.300')

Credentials are :class:`pydantic.SecretStr` and are never printed. A credential may be given as
``env:NAME`` or ``file:/path`` (systemd's ``LoadCredential=`` puts files in
``$CREDENTIALS_DIRECTORY``; ``cred:NAME`` reads from there).
"""

from __future__ import annotations

import ipaddress
import os
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import (
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.control.cooling import AmbientConfig, CoolingConfig
from agent.control.metering import MeterConfig
from agent.control.node_config import NodeRoleConfig, RemoteNodesConfig
from agent.control.thermal import ThermalConfig
from drivers.bus.settings import BrokerSettings
from drivers.errors import AgentError
from drivers.grid.mqtt_curtail import MqttCurtailSettings
from drivers.grid.openadr import OpenAdrSettings
from drivers.inputs import (
    MAX_CONFIG_BYTES,
    NUMBER_ERROR,
    InputRejected,
    StrictSettings,
    load_yaml,
    read_text_file,
)
from drivers.prices.hashprice import ComputedHashpriceSettings, CsvHashpriceSettings
from drivers.prices.http_json import HttpJsonSettings


class ConfigError(AgentError):
    """A configuration file is invalid. ``problems`` holds one line per error."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(problems))


class Strict(StrictSettings):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Every number has a physical range: a typo (or 1e308) must not reach the arithmetic, where a
# duration beyond year 9999 or an infinite limit would crash or fool the agent.
MAX_QUANTITY: Final = 1e12  # a generic sanity cap for counts of money, W, kW, ...
MAX_DURATION_S: Final = 10 * 365 * 86400.0  # ten years: any timeout or dwell is far below
MAX_KW: Final = 10_000_000.0  # 10 GW: no site is bigger
MAX_MINERS: Final = 100_000  # one controller polls ~10,000 (design.md); nodes split the rest
MAX_DEVICE_W: Final = 10_000_000.0  # 10 MW for one device or node
PRICE_RANGE_USD_PER_MWH: Final = (-100_000.0, 100_000.0)  # ERCOT's cap is 5,000
MAX_HASHPRICE_USD_PER_PH_DAY: Final = 100_000.0  # the all-time high was about 4,000

PositiveFloat = Annotated[float, Field(gt=0, le=MAX_QUANTITY, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, le=MAX_QUANTITY, allow_inf_nan=False)]
Seconds = Annotated[float, Field(gt=0, le=MAX_DURATION_S, allow_inf_nan=False)]
NonNegSeconds = Annotated[float, Field(ge=0, le=MAX_DURATION_S, allow_inf_nan=False)]
Kw = Annotated[float, Field(gt=0, le=MAX_KW, allow_inf_nan=False)]
DeviceW = Annotated[float, Field(gt=0, le=MAX_DEVICE_W, allow_inf_nan=False)]
NonNegDeviceW = Annotated[float, Field(ge=0, le=MAX_DEVICE_W, allow_inf_nan=False)]
UsdPerMwh = Annotated[
    float,
    Field(ge=PRICE_RANGE_USD_PER_MWH[0], le=PRICE_RANGE_USD_PER_MWH[1], allow_inf_nan=False),
]


# --- miners ------------------------------------------------------------------------------


class ProfileConfig(Strict):
    """One operating point of a miner model."""

    name: str = Field(min_length=1)
    power_w: DeviceW
    hashrate_ths: PositiveFloat


class MinerModelConfig(Strict):
    """A miner model: its profile ladder, standby power and nameplate (worst-case) power."""

    profiles: list[ProfileConfig] = Field(min_length=1)
    standby_w: NonNegDeviceW = 30.0
    nameplate_w: DeviceW | None = None  # defaults to the highest profile's power
    # Switching costs (agent.control.site): a wake loses this much hashing while the miner
    # boots and its boards come up, and draws this much energy beyond its profile's; a sleep
    # draws this much extra (fans and shutdown). The policy, the planner and the settlement use
    # them. None: the site default, ``control.miner_wake_lost_s`` (agent.control.site).
    wake_lost_s: float | None = Field(default=None, ge=0, le=86_400, allow_inf_nan=False)
    wake_energy_wh: float = Field(default=0.0, ge=0, le=1e6, allow_inf_nan=False)
    sleep_energy_wh: float = Field(default=0.0, ge=0, le=1e6, allow_inf_nan=False)

    @model_validator(mode="after")
    def _check(self) -> MinerModelConfig:
        names = [p.name for p in self.profiles]
        if len(set(names)) != len(names):
            raise ValueError(f"profile names must be unique (got {names})")
        if "sleep" in names:
            raise ValueError("'sleep' is reserved for the standby operating point")
        top = max(p.power_w for p in self.profiles)
        if self.nameplate_w is not None and self.nameplate_w < top:
            raise ValueError(f"nameplate_w {self.nameplate_w} is below the top profile ({top} W)")
        return self

    @property
    def max_power_w(self) -> float:
        return self.nameplate_w or max(p.power_w for p in self.profiles)


class Credentials(Strict):
    username: str = "root"
    password: SecretStr = SecretStr("")


class MinerConfig(Strict):
    """One miner, or ``count`` consecutive miners from ``address`` (ids get a -NNN suffix)."""

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    address: str
    model: str
    # "auto" asks pyasic to identify the firmware on first contact.
    firmware: Literal["luxos", "braiins", "antminer", "whatsminer", "auto"] = "auto"
    count: int = Field(default=1, ge=1, le=100_000)
    circuit: str | None = None
    credentials: Credentials | None = None

    @field_validator("address")
    @classmethod
    def _ip(cls, value: str) -> str:
        ipaddress.IPv4Address(value)
        return value

    @model_validator(mode="after")
    def _range_fits(self) -> MinerConfig:
        last = int(ipaddress.IPv4Address(self.address)) + self.count - 1
        if last > int(ipaddress.IPv4Address("255.255.255.255")):
            raise ValueError(f"{self.count} addresses from {self.address} run past 255.255.255.255")
        return self


# --- GPUs and AI jobs ------------------------------------------------------------------------


class GpuNodeConfig(Strict):
    """A GPU server: ``gpus`` cards with a power-cap range, and host overhead drawn while up."""

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    gpus: int = Field(ge=1, le=64)
    model: str = "H100-SXM"
    min_cap_w: DeviceW = 200.0
    max_cap_w: DeviceW = 700.0
    idle_w: NonNegDeviceW = 70.0
    host_overhead_w: NonNegDeviceW = 1500.0
    count: int = Field(default=1, ge=1, le=10_000)
    circuit: str | None = None
    driver: Literal["nvml", "nvml-sim", "mqtt-node"] = "nvml-sim"
    # The job scheduler's name for this host (Slurm NodeName); defaults to ``id``.
    scheduler_node: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _check(self) -> GpuNodeConfig:
        if self.min_cap_w >= self.max_cap_w:
            raise ValueError(
                f"min_cap_w ({self.min_cap_w}) must be below max_cap_w ({self.max_cap_w})"
            )
        return self


class JobClassContract(Strict):
    """What a job class earns and what interrupting it costs."""

    usd_per_gpu_hour: NonNegFloat
    penalty_usd: NonNegFloat = 0.0  # per interruption (SLA contracts)
    # A suspension loses the work since the last checkpoint (0: the job never checkpoints, and
    # loses everything since it last started).
    checkpoint_interval_s: NonNegSeconds = 1800.0
    # A resume spends this long reloading the checkpoint before the job earns again.
    resume_s: float = Field(default=0.0, ge=0, le=86_400, allow_inf_nan=False)


class SimJobConfig(Strict):
    """Jobs the simulated scheduler (``ai.scheduler: sim``) starts with: ``count`` alike."""

    job_class: Literal["sla", "preemptible", "filler"]
    gpus: int = Field(ge=1, le=64)
    count: int = Field(default=1, ge=1, le=10_000)
    node: str | None = None  # pin to this GPU node id (expanded ids for ``count`` nodes)
    utilization_pct: float = Field(default=95.0, gt=0, le=100)


class TraceConfig(Strict):
    """Deferrable training work in the backtest's synthetic job trace (per 256 GPUs, as the
    other classes): preemptible training jobs that need ``work`` hours of running before a
    deadline ``slack`` times their work after they arrive. Live, a job with a deadline (Slurm's
    ``--deadline``) is deferrable; the trace only stands in for a year of such jobs."""

    deferrable_arrivals_per_h: NonNegFloat = 0.0
    deferrable_mean_work_h: float = Field(default=8.0, gt=0, le=24 * 30, allow_inf_nan=False)
    deferrable_slack: float = Field(default=3.0, ge=1, le=30, allow_inf_nan=False)
    # GPUs per deferrable job (training runs on whole servers or pods); 0: the trace's mix.
    deferrable_gpus: int = Field(default=0, ge=0, le=4096)


class AiConfig(Strict):
    sla: JobClassContract = JobClassContract(usd_per_gpu_hour=2.5, penalty_usd=500.0)
    preemptible: JobClassContract = JobClassContract(usd_per_gpu_hour=2.0)
    filler: JobClassContract = JobClassContract(usd_per_gpu_hour=0.6)
    scheduler: Literal["sim", "slurm", "local"] = "sim"
    class_from: Literal["comment", "partition", "qos"] = "comment"
    requeue_grace_s: NonNegSeconds = 60.0
    # scheduler: sim only; empty: a default mix of SLA, preemptible and filler jobs per node.
    sim_jobs: list[SimJobConfig] = Field(default_factory=list)
    trace: TraceConfig = TraceConfig()  # the backtest's job trace only


# --- signals ---------------------------------------------------------------------------------


class CsvPriceConfig(Strict):
    type: Literal["csv_replay"]
    path: Path
    column: str
    start: datetime | None = None
    speed: float = Field(
        default=1.0, gt=0, le=1e6, allow_inf_nan=False
    )  # 1 = real time; 600 = a 15-minute interval every 1.5 s


class ConstantPriceConfig(Strict):
    type: Literal["constant"]
    value: UsdPerMwh


PriceConfig = Annotated[
    CsvPriceConfig | HttpJsonSettings | ConstantPriceConfig, Field(discriminator="type")
]


class PricesConfig(Strict):
    realtime: PriceConfig
    day_ahead: CsvPriceConfig | None = None
    # Stale-price rule (design.md): keep the last value this long, then the safe mode.
    max_age_s: Seconds = 1800.0
    # curtail: run only what beats a pessimistic price (sheds mining); hold: freeze the plan.
    safe_mode: Literal["curtail", "hold"] = "curtail"
    safe_mode_price_usd_per_mwh: UsdPerMwh = 1000.0


class HashpriceConfig(Strict):
    """Hashprice in USD per PH/s per day: a constant, or a feed (with this as the fallback)."""

    usd_per_ph_day: float = Field(
        default=55.0, gt=0, le=MAX_HASHPRICE_USD_PER_PH_DAY, allow_inf_nan=False
    )
    # A live feed: an HTTP JSON number in USD/PH/day, computed from BTC price and difficulty,
    # or a daily series replayed on the market's clock (csv_replay).
    feed: HttpJsonSettings | ComputedHashpriceSettings | CsvHashpriceSettings | None = Field(
        default=None, discriminator="type"
    )
    poll_interval_s: Seconds = 600.0
    # After this long without a good reading the constant above is used again.
    max_age_s: Seconds = 86_400.0


class FourCpConfig(Strict):
    enabled: bool = False
    rate_usd_per_kw_year: NonNegFloat = 60.0
    risk_threshold: float = Field(default=0.5, ge=0, le=1)
    # The forecast's historical precision: the share of the intervals it flags at risk 1 that
    # were the month's peak. The site prices the probability risk × hit_rate (1: take the
    # estimator at its word). The estimator flags about 100 intervals a month for one peak
    # (2023: 362 flags at risk ≥ 0.5, the 4 peaks among them), so 1 over-prices every flag by
    # about 80×: see the README's backtest section.
    hit_rate: float = Field(default=1.0, gt=0, le=1)
    system_load_csv: Path | None = None


class MqttConfig(BrokerSettings):
    """The agent's MQTT bridge: the broker (keys shared with every MQTT client), and topics."""

    enabled: bool = False
    topic_prefix: str = "site-agent"
    # Operators allowed to command over MQTT: username -> shared secret for the command HMAC/token.
    command_tokens: dict[str, SecretStr] = Field(default_factory=dict)
    # Telemetry waiting for the broker; when full the oldest is dropped (control never waits).
    queue_size: int = Field(default=10_000, ge=10, le=1_000_000)
    command_timeout_s: Seconds = 10.0  # how long the runtime may take to answer a command
    publish_telemetry: bool = True  # per-device telemetry (state, plan and events always)

    @field_validator("command_tokens", mode="before")
    @classmethod
    def _resolve_tokens(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        return {k: resolve_secret(v) if isinstance(v, str) else v for k, v in value.items()}

    @field_validator("topic_prefix")
    @classmethod
    def _topic(cls, value: str) -> str:
        if not value or any(c in value for c in "+#\0") or value.startswith("/"):
            raise ValueError("topic_prefix must be a non-empty topic without wildcards")
        return value.rstrip("/")


class GridConfig(Strict):
    """Grid signals: 4CP avoidance, and the event sources (each with its own programs)."""

    fourcp: FourCpConfig = FourCpConfig()
    openadr: OpenAdrSettings | None = None
    mqtt_curtail: MqttCurtailSettings | None = None
    # Economic events are joined when their payment plus the price beats the value of what
    # would be shed; this adds a margin on top (USD/MWh) for the risk of a shortfall penalty.
    economic_opt_in_margin_usd_per_mwh: NonNegFloat = 0.0


# --- site --------------------------------------------------------------------------------


class CircuitConfig(Strict):
    id: str
    limit_kw: Kw
    parent: str | None = None


class SiteConfig(Strict):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    interconnect_limit_kw: Kw
    # Headroom the policy keeps below every limit, for measurement error and ramping devices.
    safety_margin_kw: float = Field(default=0.0, ge=0, le=MAX_KW, allow_inf_nan=False)
    ramp_up_kw_per_min: PositiveFloat = 1e9
    circuits: list[CircuitConfig] = Field(default_factory=list)


class ControlConfig(Strict):
    interval_s: Seconds = 15.0
    poll_interval_s: Seconds = 10.0
    poll_jitter_s: NonNegSeconds = 1.0
    device_timeout_s: Seconds = 10.0
    max_concurrency: int = Field(default=200, ge=1, le=10_000)
    retries: int = Field(default=2, ge=0, le=10)
    # How long after a command telemetry must show it applied, else the device is faulted.
    verify_after_s: Seconds = 60.0
    # A faulted device is left alone this long before the agent tries it again.
    fault_retry_s: Seconds = 300.0
    hysteresis_usd_per_mwh: NonNegFloat = 5.0
    min_on_s: NonNegSeconds = 300.0
    min_off_s: NonNegSeconds = 300.0
    # Rungs of the GPU power-cap ladder (per GPU, from the card's minimum to its maximum cap).
    gpu_cap_step_w: DeviceW = 100.0
    # Hashing a miner loses per wake (boot, ramp, the pool's average catching up) for every
    # miner model that sets no ``wake_lost_s`` of its own: the policy, the horizon planner and
    # the settlement all use it (agent.control.site.wake_lost_s). 0 (the default): waking such
    # a model loses nothing; measure it per model (``miner_models.*.wake_lost_s``).
    miner_wake_lost_s: float = Field(default=0.0, ge=0, le=86_400, allow_inf_nan=False)
    # The furthest end an override or grid event may have, on every channel (CLI, MQTT, OpenADR).
    max_event_horizon_s: float = Field(
        default=7 * 86_400.0, gt=0, le=366 * 86_400.0, allow_inf_nan=False
    )


class EconomicsConfig(Strict):
    pool_fee: float = Field(default=0.02, ge=0, lt=1)
    hashprice: HashpriceConfig = HashpriceConfig()


class MetricsConfig(Strict):
    enabled: bool = True
    host: str = "127.0.0.1"  # read-only, local by default (design.md)
    port: int = Field(default=9108, ge=0, le=65535)


class StoreConfig(Strict):
    path: Path = Path("site-agent.db")


class AgentConfig(Strict):
    """The whole site configuration file."""

    site: SiteConfig
    control: ControlConfig = ControlConfig()
    economics: EconomicsConfig = EconomicsConfig()
    miner_models: dict[str, MinerModelConfig] = Field(default_factory=dict)
    miners: list[MinerConfig] = Field(default_factory=list)
    gpu_nodes: list[GpuNodeConfig] = Field(default_factory=list)
    ai: AiConfig = AiConfig()
    prices: PricesConfig
    grid: GridConfig = GridConfig()
    mqtt: MqttConfig = MqttConfig()
    metrics: MetricsConfig = MetricsConfig()
    store: StoreConfig = StoreConfig()
    node: NodeRoleConfig | None = None  # this process is a node agent (site-agent node)
    remote_nodes: RemoteNodesConfig | None = None  # node agents dispatched as fleets
    # The revenue meter at the point of interconnection, the cooling model and the ambient
    # temperature source (agent/control/metering.py, agent/control/cooling.py).
    meter: MeterConfig | None = None
    cooling: CoolingConfig = CoolingConfig()
    ambient: AmbientConfig = AmbientConfig()
    thermal: ThermalConfig = ThermalConfig()

    @model_validator(mode="after")
    def _cross_check(self) -> AgentConfig:
        problems: list[str] = []
        ids: set[str] = set()
        # Address ranges as intervals, not sets: 100,000 miners on a line stay cheap to check.
        spans: list[tuple[int, int, int]] = []
        circuits = {c.id for c in self.site.circuits}
        for i, m in enumerate(self.miners):
            if m.model not in self.miner_models:
                known = sorted(self.miner_models) or "none defined"
                problems.append(f"miners.{i}.model: unknown model {m.model!r} (known: {known})")
            if m.id in ids:
                problems.append(f"miners.{i}.id: duplicate id {m.id!r}")
            ids.add(m.id)
            first = int(ipaddress.IPv4Address(m.address))
            spans.append((first, first + m.count - 1, i))
            if m.circuit is not None and m.circuit not in circuits:
                problems.append(f"miners.{i}.circuit: unknown circuit {m.circuit!r}")
        # Sorted once: an overlap is a range starting before the furthest end seen so far.
        reach = -1
        for first, last, i in sorted(spans):
            if first <= reach:
                address = self.miners[i].address
                problems.append(f"miners.{i}.address: {address} overlaps another miner's address")
            reach = max(reach, last)
        total = sum(m.count for m in self.miners)
        if total > MAX_MINERS:
            # First: the one problem that explains all the others.
            problems.insert(
                0, f"miners: {total:,} miners in all (at most {MAX_MINERS:,} per agent)"
            )
        for i, n in enumerate(self.gpu_nodes):
            if n.id in ids:
                problems.append(f"gpu_nodes.{i}.id: duplicate id {n.id!r}")
            ids.add(n.id)
            if n.circuit is not None and n.circuit not in circuits:
                problems.append(f"gpu_nodes.{i}.circuit: unknown circuit {n.circuit!r}")
        for i, c in enumerate(self.site.circuits):
            if c.parent is not None and c.parent not in circuits:
                problems.append(f"site.circuits.{i}.parent: unknown circuit {c.parent!r}")
        if self.ambient.source == "meter" and self.meter is None:
            problems.append("ambient.source: 'meter' needs a meter: block")
        if problems:
            if len(problems) > 10:  # one readable line, however many lines are wrong
                problems = [*problems[:10], f"and {len(problems) - 10} more"]
            raise ValueError("; ".join(problems))
        return self

    def expanded_miners(self) -> list[tuple[str, str, MinerConfig]]:
        """Every miner as (device id, address, its config line), expanding ``count``."""
        out: list[tuple[str, str, MinerConfig]] = []
        for m in self.miners:
            if m.count == 1:
                out.append((m.id, m.address, m))
                continue
            first = ipaddress.IPv4Address(m.address)
            for k, device_id in enumerate(unit_ids(m.id, m.count)):
                out.append((device_id, str(first + k), m))
        return out


def unit_ids(base_id: str, count: int) -> list[str]:
    """Device ids of a ``count`` config line: the id itself, or ``id-001``, ``id-002``..."""
    if count == 1:
        return [base_id]
    width = max(3, len(str(count)))
    return [f"{base_id}-{k + 1:0{width}d}" for k in range(count)]


def resolve_secret(value: str) -> str:
    """Resolve ``env:NAME``, ``file:/path`` and ``cred:NAME`` (systemd credentials)."""
    if value.startswith("env:"):
        name = value[4:]
        if name not in os.environ:
            raise ValueError(f"environment variable {name} is not set")
        return os.environ[name]
    if value.startswith("file:"):
        return _read_secret(Path(value[5:]))
    if value.startswith("cred:"):
        folder = os.environ.get("CREDENTIALS_DIRECTORY")
        if folder is None:
            raise ValueError("cred: needs $CREDENTIALS_DIRECTORY (systemd LoadCredential=)")
        return _read_secret(Path(folder) / value[5:])
    return value


def _read_secret(path: Path) -> str:
    """A secret file: at most 64 KiB of strict UTF-8 (ValueError names the problem, not the
    content)."""
    try:
        return read_text_file(path, "secret", max_bytes=64 * 1024).strip()
    except InputRejected as exc:
        raise ValueError(f"{path}: {exc.reason.replace('_', ' ')}") from None


def _format_errors(path: str, exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        ctx = err.get("ctx") or {}
        if err["type"] == NUMBER_ERROR:  # the key is in ctx: name it in the path
            loc = ".".join(str(p) for p in (*err["loc"], ctx["field"]))
            msg = str(ctx["problem"])
        got = err.get("input")
        shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
        if "password" in loc or "token" in loc:
            shown = ""  # never echo a secret back
        lines.append(f"{path}: {loc}: {msg}{shown}")
    return lines


SECRET_KEYS = frozenset({"password", "passphrase"})


def _resolve_secrets(value: Any, key: str = "", where: str = "") -> Any:
    """Resolve ``env:``/``file:``/``cred:`` in every secret-bearing key, however deep."""
    if isinstance(value, dict):
        tokens = key == "command_tokens"
        return {
            k: _resolve_secrets(v, "password" if tokens else str(k), f"{where}.{k}".lstrip("."))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_resolve_secrets(v, key, f"{where}.{i}") for i, v in enumerate(value)]
    if key in SECRET_KEYS and isinstance(value, str):
        try:
            return resolve_secret(value)
        except (ValueError, OSError) as exc:
            raise _SecretError(f"{where}: cannot resolve the secret: {exc}") from None
    return value


class _SecretError(Exception):
    pass


def parse_config(data: Any, path: str = "<config>") -> AgentConfig:
    """Validate already-parsed YAML/JSON data; raise :class:`ConfigError` on any problem."""
    if not isinstance(data, dict):
        raise ConfigError(path, [f"{path}: (top level): expected a mapping of sections"])
    try:
        data = _resolve_secrets(data)
    except _SecretError as exc:
        raise ConfigError(path, [f"{path}: {exc}"]) from None
    try:
        cfg = AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(path, _format_errors(path, exc)) from None
    return cfg


def load_config(path: str | Path) -> AgentConfig:
    """Load and validate a site YAML file. Relative paths inside resolve against its folder."""
    p = Path(path)
    try:
        with p.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)  # the cap is checked before parsing
    except OSError as exc:
        raise ConfigError(str(p), [f"{p}: cannot read: {exc.strerror or exc}"]) from None
    try:
        # Strict UTF-8, no anchors or aliases, no duplicate keys, bounded size and depth.
        data = load_yaml(raw, str(p), max_bytes=MAX_CONFIG_BYTES)
    except InputRejected as exc:
        raise ConfigError(str(p), [f"{p}: {exc.message}"]) from None
    cfg = parse_config(data, str(p))
    return _resolve_paths(cfg, p.parent)


def _resolve_paths(cfg: AgentConfig, base: Path) -> AgentConfig:
    def fix(path: Path) -> Path:
        return path if path.is_absolute() else (base / path)

    prices = cfg.prices
    realtime = prices.realtime
    if isinstance(realtime, CsvPriceConfig):
        realtime = realtime.model_copy(update={"path": fix(realtime.path)})
    day_ahead = prices.day_ahead
    if day_ahead is not None:
        day_ahead = day_ahead.model_copy(update={"path": fix(day_ahead.path)})
    fourcp = cfg.grid.fourcp
    if fourcp.system_load_csv is not None:
        fourcp = fourcp.model_copy(update={"system_load_csv": fix(fourcp.system_load_csv)})
    economics = cfg.economics
    feed = economics.hashprice.feed
    if isinstance(feed, CsvHashpriceSettings):
        hashprice = economics.hashprice.model_copy(
            update={"feed": feed.model_copy(update={"path": fix(feed.path)})}
        )
        economics = economics.model_copy(update={"hashprice": hashprice})
    return cfg.model_copy(
        update={
            "prices": prices.model_copy(update={"realtime": realtime, "day_ahead": day_ahead}),
            "grid": cfg.grid.model_copy(update={"fourcp": fourcp}),
            "economics": economics,
        }
    )
