"""Procedural worlds (text rendering, compositional shapes) shared by the nano backbone
and the reward plugins.  Nothing is downloaded."""
from .prompts import load_prompts, write_prompt_files

__all__ = ["load_prompts", "write_prompt_files"]
