"""Tests of xraytwisted.pipeline."""
