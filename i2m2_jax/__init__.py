"""i2m2_jax: inter- and intra-modality modelling (I2M2) for multi-modal classification in JAX."""
from i2m2_jax.combine import product_of_experts
from i2m2_jax.models import (MODEL_KINDS, CNNEncoder, Conv1DEncoder, GRUEncoder, LateFusionExpert,
                             MLPEncoder, MultiModalClassifier, UniModalExpert, build_model,
                             expert_names)

__version__ = "0.1.0"
