"""Data: data sets and their registry, partitions over participants, minibatch draws z_k^t and z'.

- ``datasets``   the ``Dataset`` arrays and the bundled sets that work offline (digits, mnist5k, synthetic)
- ``readers``    on-disk sets in torchvision's layout (MNIST, Fashion-MNIST, CIFAR, Tiny ImageNet)
- ``registry``   names -> loaders, ``register_dataset`` for a user's own data, ``load_dataset``
- ``partitions`` IID / Dirichlet / shards partitions, validation splits, participant weights q_k
- ``minibatch``  minibatches as pure functions of (seed, k, t), the held-out batch z'
"""

from dice_ray.data.datasets import Dataset
from dice_ray.data.minibatch import heldout_batch, minibatch_indices, minibatch_positions
from dice_ray.data.partitions import (
    SCHEMES,
    WEIGHT_RULES,
    Partition,
    check_partition,
    participant_weights,
    partition_data,
    shrink_partition,
)
from dice_ray.data.registry import DATASETS, dataset_names, load_dataset, register_dataset

__all__ = ["DATASETS", "SCHEMES", "WEIGHT_RULES", "Dataset", "Partition", "check_partition", "dataset_names",
           "heldout_batch",
           "load_dataset", "minibatch_indices", "minibatch_positions", "participant_weights", "partition_data",
           "register_dataset", "shrink_partition"]
