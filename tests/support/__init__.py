"""Test-only helpers shared by the xraytwisted test suite (not shipped with the package)."""
