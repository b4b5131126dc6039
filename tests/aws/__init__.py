"""Tests of xraytwisted.aws."""
