"""The built-in task suite and simulated labellers (SPEC §7): prompts, demonstrations and preference judgements
from programs with a known gold score, so the recipe can run and be measured without people."""
