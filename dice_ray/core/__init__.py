"""The core math of a simulation, no Ray: topology (W^t), models, losses, the stacked population and its
vectorized step, a block of participants with its local data, misbehaving participants."""
