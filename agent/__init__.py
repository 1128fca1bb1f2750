"""The actor-critic agent that learns in the world model's imagination, and its training loop (`run.py train`)."""
