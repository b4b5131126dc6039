"""Tests of xraytwisted.listen."""
