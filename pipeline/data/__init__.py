"""Images in, tensors out: decoding, preprocessing, data sets and the splits train records."""
