"""Pictures: attention over regions (paper figures 5-7) and plots."""
