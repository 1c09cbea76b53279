"""i2m2_jax: inter- and intra-modality modelling (I2M2) for multi-modal classification in JAX."""
from i2m2_jax.combine import product_of_experts
from i2m2_jax.models import MODEL_KINDS, build_model, expert_layout
from i2m2_jax.modules import (CNNEncoder, Conv1DEncoder, GRUEncoder, LateFusionExpert, MLPEncoder,
                              MultiModalClassifier, UniModalExpert)
from i2m2_jax.tasks import MulticlassTask, MultilabelTask, SoftLabelTask, build_task

__all__ = ["MODEL_KINDS", "CNNEncoder", "Conv1DEncoder", "GRUEncoder", "LateFusionExpert",
           "MLPEncoder", "MulticlassTask", "MultiModalClassifier", "MultilabelTask",
           "SoftLabelTask", "UniModalExpert", "build_model", "build_task", "expert_layout",
           "product_of_experts"]
__version__ = "0.1.0"
