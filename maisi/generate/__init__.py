"""Generation: requests, the mask database and augmentation, latent sampling, TSP decoding, shards."""
