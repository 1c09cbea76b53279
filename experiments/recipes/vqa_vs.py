"""VQA-VS (configs/vqa_vs.py): heads on frozen backbone features. The uni-modal heads and the joint
head train alone; intra and I2M2 start from their best checkpoints of the same seed, the staged
start the official divyam3897/I2M2: vqa_nlvr/fiber/modules/fiber_module.py intends. The table
has the VQA score on the IID test set, on each out-of-distribution test set and their mean."""
from experiments.recipes import Recipe
from i2m2_jax.datasets import features, vqa_vs

STAGES = {
    "uni_image": {},
    "uni_text": {},
    "inter": {},
    "intra": {"uni_image": "uni_image", "uni_text": "uni_text"},
    "i2m2": {"uni_image": "uni_image", "uni_text": "uni_text", "joint": "inter"},
}
# VQA score (%) of I2M2 in Madaan et al., NeurIPS 2024 (arXiv 2405.17613), as extracted by a third
# party and not verified.
PUBLISHED_I2M2 = "68.63 (IID test), 48.74 (OOD mean)"
NOTES = (
    "VQA score: the mean over questions of the predicted answer's target score, 0.3 / 0.6 / 0.9 / "
    "1.0 for an answer given by 1 / 2 / 3 / >= 4 of the ten annotators (the ViLT/FIBER targets "
    "of the official code, equal to the VQA evaluation's accuracy; the VQA-VS repository's scorer "
    "gives min(1, n/3) instead). test is the IID test set, ood_<set> the out-of-distribution "
    "sets (subsets of it) and ood_mean their unweighted mean. Deviations from the official code "
    "(README: VQA-VS and NLVR2): annotators' answers normalised before counting; intra and I2M2 "
    "start from the trained heads, as the official code intends but does not do for I2M2.")


def recipe(config) -> Recipe:
  ood = [vqa_vs.OOD_PREFIX + s for s in features.split_names(config.data.ood_splits)]
  return Recipe(
      stages=STAGES, fusions={"lf": list(STAGES)}, rows=tuple(STAGES),
      metrics=("test/vqa_score", *(f"{s}/vqa_score" for s in ood),
               *((f"{vqa_vs.OOD_MEAN}/vqa_score",) if ood else ())),
      chart_metric="test/vqa_score", published={"i2m2": PUBLISHED_I2M2}, notes=NOTES)
