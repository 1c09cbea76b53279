r"""fastMRI knee (single-coil k-space and fastMRI+ labels, i2m2_jax/datasets/fastmri.py) with the
paper's recipe: magnitude and phase experts, four labels, AUROC at the official operating point.

Every model of the table for 5 seeds, then DIR/table.md, DIR/table.csv and DIR/table.png
(per-label test AUROC, their mean, and the operating-point metrics; experiments/recipes/fastmri.py):

  python experiments/reproduce.py --config configs/fastmri.py --workdir runs/fastmri --seeds 5 \
      --config.data.manual_dir=/path/to/knee     # singlecoil_train/, singlecoil_val/, the CSVs
  python experiments/reproduce.py --config configs/fastmri.py --workdir runs/fastmri --seeds 5 \
      --config.data.manual_dir=/path/to/knee --variant=staged    # I2M2 and intra from the experts

One model on its own, and the plumbing check (a few steps per stage, small widths and images):

  python -m i2m2_jax.main --config configs/fastmri.py:magnitude --workdir runs/f/magnitude \
      --config.data.manual_dir=/path/to/knee
  python experiments/reproduce.py --config configs/fastmri.py:smoke --workdir /tmp/f --seeds 1 \
      --config.data.manual_dir=/path/to/knee

Stages (STAGES below; the official divyam3897/I2M2: fastMRI/README.md and classifier.py):

  stage         model                                          AdamW lr / weight decay
  magnitude     uni: PreActResNet-18 on |x|, 1 channel         1e-5 / 1e-3
  phase         uni: PreActResNet-18 on angle(x), 1 channel    1e-4 / 1e-1
  joint         inter: one PreActResNet-18 on both stacked     1e-4 / 1e-2
                as 2 channels (fusion 'channel_stack')
  intra         PoE(magnitude, phase) per label                1e-6 / 1e-2
  i2m2          PoE(magnitude, phase, joint) per label         1e-6 / 1e-2
  intra_staged, i2m2_staged: the same, each expert initialised from the best checkpoint of its
                stage (same seed; --variant=staged or both; or by hand with
                --config.model.init_from=uni_magnitude=DIR,uni_phase=DIR,joint=DIR)

Whether the paper's I2M2 started from trained experts is not known: the official code builds its
three networks fresh (model_type_class='multimodal'), so I2M2 starts from scratch by default
(--variant=scratch); its learning rate of 1e-6 hints at fine-tuning, hence the staged variant.
The official code has no intra model for fastMRI; ours takes I2M2's hyper-parameters.

Encoders (i2m2_jax/paper_models.py:PreActResNet, encoder 'preactresnet18'): pre-activation basic
blocks [2, 2, 2, 2], widths 64/128/256/512, 3x3 stride-1 first convolution, GroupNorm with 32
groups, Kaiming-normal (fan_out) convolutions, adaptive average pooling to 10 x 10, flattened
(51,200 features); head: one linear layer of 2 logits per label (head_hidden=()), 409,608
parameters; 11,164,864 encoder parameters with one input channel (+576 with two). Dropout
none (the official drop_prob is never used). Every stage: AdamW (beta 0.9/0.999, eps 1e-8),
constant learning rate, no gradient clipping (PyTorch Lightning's defaults there), batch 16, up to
200 epochs, evaluated once per epoch, the checkpoint with the best validation mean AUROC over the
four labels kept, early stopping after 5 evaluations without a gain (the official EarlyStopping on
val_auc_mean_max, patience 5). Inputs are standardised with training-split statistics (the
official knee data module, which would say how they were scaled, is missing).

Labels (config.data.label_groups, in the order of config.data.label_names; fastMRI+ 1.0's 21
slice-level knee strings, matched case-insensitively and whitespace-normalised; the official
mapping lives in the missing data module, so this one is ours):

  abnormal    any slice-level finding: every string below plus Bone-Fracture/Contusion/
              dislocation, Bone- Subchondral edema, Bone - Lesion, Joint Effusion, Joint Bodies,
              Periarticular cysts, Soft Tissue Lesion, Muscle Strain, the PCL, MCL and LCL sprains
              and Patellar Retinaculum - High grade sprain (not the study-level 'artifact')
  mtear       Meniscus Tear, Displaced Meniscal Tissue (a displaced fragment is a torn meniscus)
  acl         Ligament - ACL Low Grade sprain, Ligament - ACL High Grade Sprain
  cartilage   Cartilage - Partial Thickness loss/defect, Cartilage - Full Thickness loss/defect

Loss: the sum over the four labels of each label's class-weighted cross-entropy of the product
of experts (config.task.class_weights='balanced': n / (2 n_c) from the training split's labels).
The official weights file (data/loss_fn_weights_knee_tr.p) is not in the official repository, so
its weights are unknown.

Metrics (results.json, per label and averaged; i2m2_jax/tasks.py:MultilabelTask): AUROC and, at
the official operating point (the first ROC threshold whose false-negative rate is below 0.1,
chosen on validation and applied to test), balanced accuracy, sensitivity and specificity;
test.auroc_std and test.per_label.<label>.auroc_std: the bootstrap standard deviation of the test
AUROC over config.eval.bootstrap_samples = 50 seeded resamples. The official test step chooses
its operating point on the test split itself and scores its uni-modal models by the logit of
class 1; here every model is scored by its probability of class 1.

Time and memory, at full size (320 x 320, widths 64..512, batch 16; one epoch = ceil(N / 16)
train steps + one pass over validation, with about N = 29,300 training and 6,300 validation
slices: 70 % and 15 % of the 41,877 slices of the 1,172 annotated volumes, before the wide ones
are dropped), estimated with `experiments/time_per_epoch.py` (random data of the real shapes):

  python experiments/time_per_epoch.py --config configs/fastmri.py --batch_size 2 --steps 1 \
      --warmup 1 --eval_examples 4 --stages magnitude,joint

  stage      parameters   s per train step of 2   eval s / example   epoch         train memory
  magnitude  11,574,472   74.0                    3.0                ~12.8 days    638 MiB / ex.
  joint      11,575,048   39.1                    1.8                ~6.8 days     638 MiB / ex.

  (2-core AMD EPYC with AVX2, shared and loaded at the time, so the two experts, which cost the
  same, differ by 2x: read both as "about a week per epoch per expert"; I2M2 runs three experts.
  The memory is XLA's temporary buffers per training example, so batch 16 needs about 10 GiB.)
  Measured before the trainer's CPU steps took XLA's own convolutions, which made the fastMRI
  step 1.5-1.8x faster at 64 x 64 (README: Performance). A full-size run needs an accelerator;
  the GPU time per epoch is not measured yet (no GPU was lent; experiments/gpu_check.sh has it).
"""
import ml_collections

from configs import default

DEFAULT_STAGE = "i2m2"
# stage -> (model kind, uni-modal modality, AdamW learning rate, weight decay)
STAGES = {
    "magnitude": ("uni", "magnitude", 1e-5, 1e-3),
    "phase": ("uni", "phase", 1e-4, 1e-1),
    "joint": ("inter", "", 1e-4, 1e-2),
    "intra": ("intra", "", 1e-6, 1e-2),
    "i2m2": ("i2m2", "", 1e-6, 1e-2),
    "intra_staged": ("intra", "", 1e-6, 1e-2),
    "i2m2_staged": ("i2m2", "", 1e-6, 1e-2),
}

# label -> fastMRI+ label strings (module docstring).
LABEL_GROUPS = {
    "abnormal": (
        "Meniscus Tear", "Displaced Meniscal Tissue",
        "Ligament - ACL Low Grade sprain", "Ligament - ACL High Grade Sprain",
        "Cartilage - Partial Thickness loss/defect", "Cartilage - Full Thickness loss/defect",
        "Bone-Fracture/Contusion/dislocation", "Bone- Subchondral edema", "Bone - Lesion",
        "Joint Effusion", "Joint Bodies", "Periarticular cysts", "Soft Tissue Lesion",
        "Muscle Strain", "Ligament - PCL Low-Mod grade sprain", "Ligament - PCL High Grade",
        "Ligament - MCL Low-Mod Grade Sprain", "Ligament - MCL High Grade sprain",
        "LCL Complex - Low-Mod Grade Sprain", "LCL Complex- High Grade Sprain",
        "Patellar Retinaculum - High grade sprain"),
    "mtear": ("Meniscus Tear", "Displaced Meniscal Tissue"),
    "acl": ("Ligament - ACL Low Grade sprain", "Ligament - ACL High Grade Sprain"),
    "cartilage": ("Cartilage - Partial Thickness loss/defect",
                  "Cartilage - Full Thickness loss/defect"),
}
RESNET18 = {"widths": (64, 128, 256, 512), "blocks": (2, 2, 2, 2), "pooled_size": 10}
# smoke: a few steps of every stage on 32 x 32 images through one narrow ResNet stage.
SMOKE_RESNET = {"widths": (8,), "blocks": (1,), "pooled_size": 2}


def get_config(arg=None):
  """`arg`: comma-separated tokens: at most one stage (default 'i2m2') and optionally 'smoke'."""
  tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
  stages = [t for t in tokens if t in STAGES]
  if len(stages) > 1 or any(t not in STAGES and t != "smoke" for t in tokens):
    raise ValueError(f"configs/fastmri.py: bad argument {arg!r}; expected at most one stage of "
                     f"{list(STAGES)} and optionally 'smoke', comma-separated.")
  stage = stages[0] if stages else DEFAULT_STAGE
  kind, modality, learning_rate, weight_decay = STAGES[stage]
  smoke = "smoke" in tokens

  config = default.get_config()
  config.stage = stage
  config.data.name = "fastmri"
  config.data.image_size = 32 if smoke else 320  # divides 320: the crop is block-averaged
  config.data.label_groups = ml_collections.ConfigDict(LABEL_GROUPS)
  config.data.label_names = ",".join(LABEL_GROUPS)  # the labels, in order (ConfigDicts sort)

  config.batch_size = 16
  config.eval_batch_size = 64
  config.num_epochs = 200.0
  config.eval_every_steps = -1      # once per epoch
  config.log_every_steps = 100
  config.selection_metric = "auroc"  # mean over the labels
  config.early_stopping_patience = 5
  config.task.name = "multilabel"
  config.task.class_weights = "balanced"
  config.eval.bootstrap_samples = 50

  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = learning_rate
  config.optimizer.weight_decay = weight_decay
  config.optimizer.grad_clip_norm = 0.0
  config.optimizer.schedule = "constant"
  config.optimizer.warmup_steps = 0

  resnet = SMOKE_RESNET if smoke else RESNET18
  config.model.kind = kind
  config.model.modality = modality
  config.model.fusion = "channel_stack"  # the joint expert: magnitude and phase as 2 channels
  config.model.encoders = "magnitude=preactresnet18,phase=preactresnet18"
  config.model.encoder_kwargs = ml_collections.ConfigDict(
      {m: dict(resnet) for m in ("magnitude", "phase")})
  config.model.head_hidden = ()     # one linear layer: 2 logits per label
  config.model.dropout_rate = 0.0
  config.model.init_from = ""

  if smoke:
    default.shrink_for_smoke(config, steps=4, batch_size=4, eval_batch_size=8, eval_every=2,
                             log_every=2, head_hidden=None)
    config.eval.bootstrap_samples = 5
  return config
