"""The training-worker skeleton the detector, captioner and VQA loops share: sessions,
the TorchTrainer, batch sharding, reduction over workers, checkpoints."""
