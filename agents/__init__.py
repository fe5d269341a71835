"""The node agent (installed as adaptrun.agents)."""
