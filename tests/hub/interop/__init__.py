"""Independent TUF clients (python-tuf ngclient, tuf-js) against a real hub."""
