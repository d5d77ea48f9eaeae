"""Data influence in decentralized learning (SPEC §2–§5): ground truth, estimator, and their uses."""
