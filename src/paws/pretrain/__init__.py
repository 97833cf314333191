"""PAWS pre-training: one step as the paper writes it, the loop over steps, and the run around
them (open -> build -> restore -> loop -> finish)."""
