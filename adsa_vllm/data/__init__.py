"""Real image data for measuring ADSA's quality cost (project issue #5). Pure numpy, no torch/vLLM import."""
