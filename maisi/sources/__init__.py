"""Where cases come from: the dataset catalog, downloads, converters, local folders and the phantom."""
