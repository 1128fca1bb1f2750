"""Environments and data sources: Crafter and NetHack as image environments, CLEVR-like scenes, vectorized
collection and episode files. Importing `envs` registers `slotworld/Crafter-v0` and `slotworld/NetHack-v0`
with gymnasium (the games themselves are imported only when an env is made)."""
import gymnasium as gym

STATUS_LEVELS = 16  # an env's status tokens (obs["status"]) are in [0, 16); the world model's frame codes hold as many
STATUS_NAMES = {"nethack": ("hp", "energy", "hunger", "encumbrance", "depth", "level", "ac")}  # each env's, in order
# the games' constructor defaults (task and crop: NetHack's), which collect, datasets and the agent's config share
ENV_DEFAULTS = {"max_episode_steps": 10_000, "task": "score", "crop": 9}

if "slotworld/Crafter-v0" not in gym.registry:
    gym.register(id="slotworld/Crafter-v0", entry_point="envs.crafter:CrafterEnv")
if "slotworld/NetHack-v0" not in gym.registry:
    gym.register(id="slotworld/NetHack-v0", entry_point="envs.nethack:NetHackEnv")
