"""Collectors: what puts data into Kafka (rotel/otelcol-contrib configs, the NVML GPU exporter)."""
