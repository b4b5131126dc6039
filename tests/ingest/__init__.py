"""Tests of xraytwisted.ingest."""
