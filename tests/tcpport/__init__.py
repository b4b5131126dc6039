"""Tests of xraytwisted.tcpport."""
