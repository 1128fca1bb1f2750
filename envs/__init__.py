"""Environments and data sources: CLEVR-like scenes (and later Crafter, NetHack)."""
