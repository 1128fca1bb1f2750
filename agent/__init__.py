"""The actor-critic agent that learns in the world model's imagination (see the agent issue)."""
