"""`make demo`: the whole paper on a synthetic world, stage by stage, ending in a report."""
