"""Tests of xraytwisted.outbound."""
