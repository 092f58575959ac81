"""The fleet simulator: many agents in one process, for demos and scale tests."""
