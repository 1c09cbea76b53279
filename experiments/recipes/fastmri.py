"""fastMRI knee (configs/fastmri.py): the magnitude, phase and joint experts train alone; intra
and I2M2 start from scratch (--variant=scratch, the default, as the official divyam3897/I2M2:
fastMRI/module.py builds them) or from the experts' best checkpoints of the same seed
(--variant=staged: rows intra_staged and i2m2_staged), or both run (--variant=both). The table
shows the test AUROC per label and its mean, and the mean operating-point metrics."""
from experiments.recipes import Recipe

EXPERTS = {"uni_magnitude": "magnitude", "uni_phase": "phase"}
# stage -> {expert: stage whose best checkpoint initialises it}
STAGES = {
    "magnitude": {},
    "phase": {},
    "joint": {},
    "intra": {},
    "i2m2": {},
    "intra_staged": dict(EXPERTS),
    "i2m2_staged": {**EXPERTS, "joint": "joint"},
}
VARIANTS = {
    "scratch": ["magnitude", "phase", "joint", "intra", "i2m2"],
    "staged": ["magnitude", "phase", "joint", "intra_staged", "i2m2_staged"],
    "both": list(STAGES),
}


def recipe(config) -> Recipe:
  labels = [name.strip() for name in config.data.label_names.split(",")]
  return Recipe(
      stages=STAGES, fusions=VARIANTS, rows=tuple(STAGES),
      metrics=(*(f"test/per_label/{label}/auroc" for label in labels), "test/auroc",
               "test/auroc_std", "test/balanced_accuracy", "test/sensitivity",
               "test/specificity"),
      chart_metric="test/auroc",
      # The paper's fastMRI numbers were not extracted (no third-party extraction to cite).
      published={})
