"""Distillation: prompts (privileged contexts), objectives, the pure train step, the loop."""
