"""Image files in and out: decoding, metadata, saving."""
