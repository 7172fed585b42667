"""Search strategies for the BNAS space: BinaryDARTS and fixes that let NNI's own strategies run on it."""
