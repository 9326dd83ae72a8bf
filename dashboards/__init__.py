"""Dashboards: Prometheus metrics, Grafana dashboards as code and provisioning."""
