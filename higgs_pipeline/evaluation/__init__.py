"""Evaluating a trained adapter: validation losses against its base model, generated audio, loss curves."""
