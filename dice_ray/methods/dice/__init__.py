"""Data influence in decentralized learning (concepts §2–§5): ground truth, estimator, and their uses."""

import warnings

# torch.func.jvp/vjp import a module that warns about torch.jit.script's deprecation; it is not ours to fix.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
