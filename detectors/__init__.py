"""Pure online detectors: stdlib + numpy/scipy only, no Kafka, no clock, no environment."""
