r"""VQA-VS (i2m2_jax/datasets/vqa_vs.py): I2M2 heads on frozen backbone features, soft answers.

Every stage for 3 seeds, then DIR/table.md (VQA score on the IID test set, each of the nine
out-of-distribution test sets and their mean, per-expert scores, the paper's I2M2 numbers):

  python experiments/reproduce.py --config configs/vqa_vs.py --workdir runs/vqa_vs --seeds 3 \
      --config.data.manual_dir=/data/vqa_vs

where /data/vqa_vs holds the VQA-VS release (Training/Training-Ques.json,
Training/Training-Ans.json, Val/..., IID-Test/..., OOD-Test/<split>/OOD-Test-<split>-Ques.json)
and the features of each split in features/Training, features/Val, features/IID-Test (folders of
question_id.npy, image.npy, text.npy, fused.npy, as experiments/extract_features.py writes them,
or .npz files of the same name; the data set's docstring has every field). One stage alone:

  python -m i2m2_jax.main --config configs/vqa_vs.py:uni_text --workdir runs/vqa_vs/uni_text \
      --config.data.manual_dir=/data/vqa_vs
  R=runs/vqa_vs
  python -m i2m2_jax.main --config configs/vqa_vs.py:i2m2 --workdir $R/i2m2 \
      --config.data.manual_dir=/data/vqa_vs \
      --config.model.init_from=uni_image=$R/uni_image,uni_text=$R/uni_text,joint=$R/inter
  python experiments/reproduce.py --config configs/vqa_vs.py:smoke --workdir /tmp/vqa_smoke \
      --seeds 1 --config.data.manual_dir=...   # a few steps per stage (a plumbing check)

Recipe (the official divyam3897/I2M2: vqa_nlvr/, README command and fiber/config.py,
fiber_module.py): the backbone is frozen and only the heads train; each head is Linear(d, 1536)
-> LayerNorm -> GELU -> Linear(1536, C) (`config.model.head='fiber'`, normal(0.02) init) on the
image features (uni_image), the text features (uni_text) or the fused features (joint), C = the
answer vocabulary (3,129 on VQA v2). AdamW with betas (0.9, 0.98), eps 1e-8 and PyTorch's default
weight decay 0.01, learning rate 1e-4, constant (the heads' optimiser has no schedule), no
gradient clipping, batch 512, 100 epochs, evaluation once per epoch, the checkpoint selected by
the validation VQA score. Loss: the official binary cross-entropy on the product's
log-probabilities (`config.task.loss='vqa_bce'`; 'soft_ce' is the alternative). Features reach
the heads as the backbone gives them (no standardisation). Stages (experiments/recipes/vqa_vs.py):

  stage      model                                   init from
  uni_image  head on image features                  scratch
  uni_text   head on text features                   scratch
  inter      head on fused features (the joint one)  scratch
  intra      PoE(uni_image, uni_text)                uni_image, uni_text
  i2m2       PoE(uni_image, uni_text, joint)         uni_image, uni_text, inter

The staged start of intra and I2M2 is the one the official fiber_module.py intends: it loads the
separately trained heads, but its I2M2 experiment name ('inter_and_intra_multimodal_vqa') never
matches the name that branch tests, so the official I2M2 heads start from random weights.

Expected cost: the heads are small (I2M2 on FIBER's 768/768/1536 features with 3,129 answers:
19.2 M parameters, 6 x 19.1 M = 115 MFLOP per training example in its dense layers);
`python experiments/head_speed.py` measures every stage's step (README: VQA-VS and NLVR2).
On the project's shared 2-core CPU VM (load average 10-17), the I2M2 step at batch 512 ran at
200 examples/s (the experts alone 380-800): ~8 minutes per epoch of 100,000 questions, so 100
epochs want an accelerator. GPU: not measured.

Published (Madaan et al., NeurIPS 2024, arXiv 2405.17613, as extracted by a third party and not
verified): I2M2 VQA score 68.63 on the IID test set and 48.74 averaged over the OOD test sets.
"""
import ml_collections

from configs import default

DEFAULT_STAGE = "i2m2"
# stage -> (model kind, uni-modal modality); every stage has the same hyper-parameters.
STAGES = {
    "uni_image": ("uni", "image"),
    "uni_text": ("uni", "text"),
    "inter": ("inter", ""),
    "intra": ("intra", ""),
    "i2m2": ("i2m2", ""),
}


def parse_tokens(arg, config_file: str) -> tuple[str, bool]:
  """`arg` of get_config: at most one stage (default 'i2m2') and optionally 'smoke'."""
  tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
  stages = [t for t in tokens if t in STAGES]
  if len(stages) > 1 or any(t not in STAGES and t != "smoke" for t in tokens):
    raise ValueError(f"{config_file}: bad argument {arg!r}; expected at most one stage of "
                     f"{list(STAGES)} plus optionally 'smoke', comma-separated.")
  return (stages[0] if stages else DEFAULT_STAGE), "smoke" in tokens


def heads_on_features(stage: str, smoke: bool, expert_inputs: str, modalities: str,
                      batch_size: int) -> ml_collections.ConfigDict:
  """The official recipe of heads on frozen features (module docstring), shared with NLVR2."""
  kind, modality = STAGES[stage]
  config = default.get_config()
  config.stage = stage
  config.batch_size = batch_size
  config.eval_batch_size = 1024
  config.num_epochs = 100.0
  config.eval_every_steps = -1      # once per epoch
  config.log_every_steps = 100
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-4
  config.optimizer.beta1, config.optimizer.beta2, config.optimizer.eps = 0.9, 0.98, 1e-8
  config.optimizer.weight_decay = 0.01  # torch.optim.AdamW's default
  config.optimizer.grad_clip_norm = 0.0
  config.optimizer.schedule = "constant"
  config.model.kind = kind
  config.model.modality = modality
  config.model.expert_inputs = expert_inputs
  config.model.encoders = ",".join(f"{m}=identity" for m in modalities.split(","))
  config.model.head = "fiber"
  config.model.head_hidden = (1536,)
  config.data.standardize = False   # the heads see the backbone's features as they are
  if smoke:
    default.shrink_for_smoke(config, steps=4, batch_size=8, eval_batch_size=16, eval_every=2,
                             log_every=2, head_hidden=(16,))
  return config


def get_config(arg=None):
  stage, smoke = parse_tokens(arg, "configs/vqa_vs.py")
  config = heads_on_features(stage, smoke, "uni_image=image,uni_text=text,joint=fused",
                             "image,text,fused", batch_size=512)
  config.task.name = "soft_label"
  config.task.loss = "vqa_bce"
  config.data.name = "vqa_vs"
  # Names as the VQA-VS release has them, relative to manual_dir ({split}: the split's name).
  config.data.splits = ml_collections.ConfigDict(
      {"train": "Training", "val": "Val", "test": "IID-Test"})
  config.data.questions = "{split}/{split}-Ques.json"
  config.data.annotations = "{split}/{split}-Ans.json"
  config.data.features = "features/{split}"  # a folder of <key>.npy files, or that name + .npz
  config.data.ood_splits = "QT,KW,KWP,QT+KW,KO,KOP,QT+KO,KW+KO,QT+KW+KO"
  config.data.ood_questions = "OOD-Test/{split}/OOD-Test-{split}-Ques.json"
  config.data.ood_ids_file = ""     # e.g. 'test_annotations.json': OOD ids from its '<split>_qid'
  config.data.min_answer_count = 9  # answer vocabulary: multiple-choice answers seen this often
  config.data.normalize_annotator_answers = True  # False: counted as written (write_vqa.py)
  return config
