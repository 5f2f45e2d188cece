"""Below the pipeline, imported by every layer above: settings, metrics, logs, errors, health."""
