"""Streams: the Faust app, topics and agents; OTLP decoding and semantic-convention mapping; snapshots."""
