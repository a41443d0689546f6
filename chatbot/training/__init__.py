"""Training and model versions: the dataset export, fine-tuning, evaluation, versions and rollouts."""
