"""Paper section 3.2: the Up-Down captioner, its decoding, data, objectives, training and prediction."""
