"""Operator tools on top of everything: the command line, status, demo data, bulk producer."""
