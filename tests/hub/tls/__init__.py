"""Tests of the hub CA and of mutual TLS."""
