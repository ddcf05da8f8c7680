"""edgeforge host optimizer: train, prune, quantize and export a CNN into a board bundle."""
