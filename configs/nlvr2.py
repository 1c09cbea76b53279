r"""NLVR2 (i2m2_jax/datasets/nlvr2.py): I2M2 heads on frozen backbone features of a statement and
two images; accuracy.

Every stage for 3 seeds, then DIR/table.md (test1 accuracy, the balanced and unbalanced test sets
when their files are there, per-expert accuracies, the paper's I2M2 number):

  python experiments/reproduce.py --config configs/nlvr2.py --workdir runs/nlvr2 --seeds 3 \
      --config.data.manual_dir=/data/nlvr2_features

where /data/nlvr2_features holds train, dev and test1 (and optionally balanced_dev,
balanced_test1, unbalanced_dev, unbalanced_test1): each a folder of text.npy, image_0.npy,
image_1.npy, fused_0.npy, fused_1.npy and label.npy (experiments/extract_features.py --task nlvr2
writes them), or an .npz of the same name. One stage:

  python -m i2m2_jax.main --config configs/nlvr2.py:i2m2 --workdir runs/nlvr2/i2m2 \
      --config.data.manual_dir=/data/nlvr2_features
  python experiments/reproduce.py --config configs/nlvr2.py:smoke --workdir /tmp/nlvr2_smoke \
      --seeds 1 --config.data.manual_dir=...   # a few steps per stage (a plumbing check)

Recipe: the heads of configs/vqa_vs.py (Linear -> LayerNorm -> GELU -> Linear(1536, 2),
normal(0.02) init; AdamW betas (0.9, 0.98), eps 1e-8, weight decay 0.01, learning rate 1e-4
constant, no clipping, 100 epochs, evaluation once per epoch) with NLVR2's batch of 256
(divyam3897/I2M2: vqa_nlvr/fiber/config.py, task_inter_and_intra_multimodal_nlvr2), cross-entropy,
the checkpoint selected by validation (dev) accuracy. The image expert reads both images'
features concatenated (Linear(2 Di, 1536)), the text expert the statement's, the joint expert
both fused features concatenated (Linear(2 Df, 1536)), as the official heads
(fiber/modules/classify.py). Every model from scratch: the official NLVR2 heads are not staged.

Differences from the official code: it fine-tunes NLVR2 end to end in principle, but its run.py
freezes the backbone and stops with ValueError for any task but VQA, so frozen features with the
VQA recipe are the runnable reading. Stages as configs/vqa_vs.py: uni_image, uni_text, inter,
intra, i2m2 (experiments/recipes/nlvr2.py).

Published (Madaan et al., NeurIPS 2024, arXiv 2405.17613, as extracted by a third party and not
verified): I2M2 accuracy 85.36 on the test set.
"""
import ml_collections

from configs import vqa_vs


def get_config(arg=None):
  stage, smoke = vqa_vs.parse_tokens(arg, "configs/nlvr2.py")
  config = vqa_vs.heads_on_features(
      stage, smoke, "uni_image=image_0+image_1,uni_text=text,joint=fused_0+fused_1",
      "text,image_0,image_1,fused_0,fused_1", batch_size=256)
  config.task.name = "multiclass"
  config.selection_metric = "accuracy"
  config.data.name = "nlvr2"
  # The NLVR2 release's split names; each split's features: a folder of <key>.npy files under
  # manual_dir, or that name + .npz.
  config.data.splits = ml_collections.ConfigDict({"train": "train", "val": "dev", "test": "test1"})
  config.data.features = "{split}"
  # Evaluated with the best checkpoint when their files are present.
  config.data.extra_test_splits = "balanced_dev,balanced_test1,unbalanced_dev,unbalanced_test1"
  return config
