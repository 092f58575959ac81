"""Management API tests."""
