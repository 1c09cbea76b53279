"""AV-MNIST (configs/avmnist.py): the official staged recipe (divyam3897/I2M2:
avmnist_and_mimic/avmnist_main.py). The uni-modal experts and the joint models train alone;
intra and I2M2 start from their best checkpoints of the same seed and are fine-tuned."""
from experiments.recipes import MULTIBENCH_DEVIATIONS, Recipe

# stage -> {expert: stage whose best checkpoint initialises it}
STAGES = {
    "uni_image": {},
    "uni_audio": {},
    "inter_lf": {},
    "inter_lrtf": {},
    "intra": {"uni_image": "uni_image", "uni_audio": "uni_audio"},
    "i2m2": {"uni_image": "uni_image", "uni_audio": "uni_audio", "joint": "inter_lf"},
    "i2m2_lrtf": {"uni_image": "uni_image", "uni_audio": "uni_audio", "joint": "inter_lrtf"},
}
# --fusion: I2M2's joint expert from inter_lf (lf), from inter_lrtf (lrtf), or both variants.
FUSIONS = {"lf": [s for s in STAGES if s != "i2m2_lrtf"],
           "lrtf": [s for s in STAGES if s != "i2m2"],
           "both": list(STAGES)}
# Test accuracy (%) of I2M2 in Madaan et al., NeurIPS 2024 (arXiv 2405.17613), as extracted by a
# third party and not verified; the paper's text does not say which fusion it is.
PUBLISHED_I2M2 = "72.38 (test acc)"


def recipe(config) -> Recipe:
  del config  # one recipe for every AV-MNIST config
  return Recipe(
      stages=STAGES, fusions=FUSIONS,
      rows=("uni_image", "uni_audio", "intra", "inter_lf", "inter_lrtf", "i2m2", "i2m2_lrtf"),
      metrics=("test/accuracy", "test/ece"), chart_metric="test/accuracy",
      published={"i2m2": PUBLISHED_I2M2, "i2m2_lrtf": PUBLISHED_I2M2},
      notes=MULTIBENCH_DEVIATIONS)
