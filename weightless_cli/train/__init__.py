"""Training with PyTorch (the optional `train` extra); this package module itself imports no torch."""

LR_SCHEDULES = ("constant", "cosine")  # constant, or annealed from lr to zero over one retraining
