"""Full float32 in every process that imports this module: no TF32 in cuBLAS matmuls or cuDNN convolutions.

``bench_gpu.py`` names it in a run config's ``imports``, so each Ray worker hosting participants imports it
before building them: the CPU-vs-GPU comparison of the CNN then separates TF32 from reduction order.
"""

import torch

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.set_float32_matmul_precision("highest")
