"""dice-ray: decentralized (gossip) learning at scale on Ray, and the data influence cascade (DICE).

Modules, one concept each (math modules know nothing of Ray):

- ``topology``   graphs and mixing matrices W^t
- ``data``       data sets, partitions, minibatch draws, the held-out batch z'
- ``models``     model registry
- ``population`` many participants' parameters stacked along dim 0 and their vectorized step
- ``config``     the run configuration (validated dataclasses, YAML, CLI overrides)
- ``results``    Parquet schemas and atomic writers
- ``engine``     Ray actors and the synchronous round loop
- ``simulate``   ``python -m dice_ray.simulate``
"""

__version__ = "0.1.0"
