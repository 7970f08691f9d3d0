"""Model classes that XTuner 0.x configs import by path, each on transformers' own classes."""
