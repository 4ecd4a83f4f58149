"""Real image data for measuring ADSA's quality cost (project issue #5), no vLLM import.

fashion_mnist: the data as pixel tokens (pure numpy, no torch); classifier: the CNN whose features give FID and whose
predictions give class accuracy of samples (torch)."""
