"""NLVR2 (configs/nlvr2.py): heads on frozen backbone features, every model from scratch (the
official NLVR2 heads are not staged). The table adds the balanced and unbalanced test sets."""
from experiments.recipes import Recipe
from i2m2_jax.datasets import features

STAGES = {"uni_image": {}, "uni_text": {}, "inter": {}, "intra": {}, "i2m2": {}}
# Test accuracy (%) of I2M2 in Madaan et al., NeurIPS 2024 (arXiv 2405.17613), as extracted by a
# third party and not verified.
PUBLISHED_I2M2 = "85.36 (test acc)"
NOTES = ("test is test1; the balanced and unbalanced sets are shown when their feature files "
         "were there. Deviation from the official code (README: VQA-VS and NLVR2): the backbone "
         "is frozen (its run.py freezes it and then stops for any task but VQA).")


def recipe(config) -> Recipe:
  extra = features.split_names(config.data.extra_test_splits)
  return Recipe(
      stages=STAGES, fusions={"lf": list(STAGES)}, rows=tuple(STAGES),
      metrics=("test/accuracy", *(f"{s}/accuracy" for s in extra), "test/ece"),
      chart_metric="test/accuracy", published={"i2m2": PUBLISHED_I2M2}, notes=NOTES)
