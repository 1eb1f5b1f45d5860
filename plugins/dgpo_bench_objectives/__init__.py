"""First-party objectives: ``dgpo``, ``flow-grpo`` and ``diffusion-dpo``, with their presets."""
