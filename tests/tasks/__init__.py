"""Task registry tests (a package, so its test_registry.py can coexist with tests/test_registry.py)."""
