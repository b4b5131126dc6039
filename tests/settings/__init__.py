"""Tests of xraytwisted.settings."""
