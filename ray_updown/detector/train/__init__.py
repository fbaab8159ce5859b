"""Training the bottom-up detector (paper 3.1) on Visual Genome-format data with Ray Train."""
