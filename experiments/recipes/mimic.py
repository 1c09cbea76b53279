"""MIMIC-III (configs/mimic.py:<task>): every model from scratch, as the official
divyam3897/I2M2: avmnist_and_mimic/mimic_main.py trains them."""
from experiments.recipes import Recipe

STAGES = {"uni_static": {}, "uni_timeseries": {}, "intra": {}, "inter": {}, "i2m2": {}}
# The ICD-9 tasks are binary and their models are selected by validation AUPRC (configs/mimic.py),
# so their table adds AUROC and AUPRC.
METRICS = {
    "mortality": ("test/accuracy", "test/ece"),
    "icd9_140_239": ("test/accuracy", "test/auroc", "test/auprc", "test/ece"),
    "icd9_460_519": ("test/accuracy", "test/auroc", "test/auprc", "test/ece"),
}
# Test accuracy (%) of I2M2 in Madaan et al., NeurIPS 2024 (arXiv 2405.17613), as extracted by a
# third party and not verified; none was extracted for ICD-9 460-519.
PUBLISHED_I2M2 = {"mortality": "78.10 (test acc)", "icd9_140_239": "91.58 (test acc)"}


def recipe(config) -> Recipe:
  task = config.data.task
  published = PUBLISHED_I2M2.get(task)
  return Recipe(
      stages=STAGES, fusions={"lf": list(STAGES)},  # only the late-fusion joint expert
      rows=tuple(STAGES), metrics=METRICS[task], chart_metric="test/accuracy",
      published={"i2m2": published} if published else {},
      robustness_kinds="static=feature_drop")  # tabular: MultiBench drops entries
