"""CIDEr-D, the pycocoevalcap wrapper, the official VQA accuracy and detection mAP."""
