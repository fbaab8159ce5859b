"""Images to region features with Ray Data: inputs and plans, per-image steps, writers."""
