"""Alerts: alert model, routing/dedup/grouping/rate-limit policy and notifiers."""
