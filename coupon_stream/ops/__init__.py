"""Operator tools: settings, command line, status, metrics, health, logs, demo data."""
