"""The learning runs: real data, real training and continual-learning experiments (mostly marked slow)."""
