"""Images to region features with Ray Data: inputs and plans, decode and detect stages, writers."""
