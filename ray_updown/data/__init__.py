"""Datasets in their real file formats (COCO/Karpathy, VQA v2, Visual Genome, GloVe) and the synthetic world."""
