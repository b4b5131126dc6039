"""Tests of xraytwisted.observe."""
