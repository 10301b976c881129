"""Upscaling jobs: the pipeline of passes, run folders, the Upscaler and folder batches."""
