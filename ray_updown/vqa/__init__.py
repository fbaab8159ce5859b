"""Paper section 3.3: the Up-Down VQA model, its data, training, ensembles, sweeps and prediction."""
