"""Defaults shared by every config; a data set's config imports this and overrides what differs.

Not a run on its own: use configs/synthetic.py, configs/digits.py or configs/npz.py.
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Length: num_train_steps > 0 wins; otherwise num_epochs of the train split, clipped to
  # [min_train_steps, max_train_steps] (max_train_steps <= 0: no cap).
  config.batch_size = 128          # global batch, split over all devices of all processes
  config.eval_batch_size = 256
  config.num_epochs = 30.0
  config.num_train_steps = -1
  config.min_train_steps = 0
  config.max_train_steps = -1

  config.log_every_steps = 50
  config.eval_every_steps = -1     # <= 0: once per epoch, at most every min_steps_between_evals
  config.min_steps_between_evals = 1
  config.checkpoint_every_steps = -1  # <= 0: at every evaluation
  config.keep_checkpoints = 2      # latest N kept, plus the best on validation
  # The validation metric that picks the best checkpoint, in the task's direction (nll and ece
  # lower is better); '' is the task's own: accuracy, auroc (multilabel), vqa_score (soft labels).
  config.selection_metric = ""
  config.early_stopping_patience = -1   # evaluations without a gain before stopping; <= 0: never
  config.parallel = "jit"          # 'jit' (Mesh + NamedSharding) or 'pmap'
  # results.json: test metrics with each modality missing (product of the experts not reading it)
  config.eval_missing_modalities = True
  # results.json: which expert decides the product's test predictions (i2m2, intra)
  config.eval_attribution = True

  # What is predicted (i2m2_jax/tasks.py): '' for the data set's default, or multiclass |
  # multilabel | soft_label.
  config.task = ml_collections.ConfigDict()
  config.task.name = ""
  # multilabel: '' (none), 'balanced' (from training-label frequencies), 'w0,w1' (every label)
  # or 'w0,w1;w0,w1;...' (one pair per label).
  config.task.class_weights = ""
  config.task.loss = "vqa_bce"     # soft_label: vqa_bce (the official VQA recipe) | soft_ce

  # Test metrics: multilabel tasks report the bootstrap std of the test AUROC over this many
  # seeded resamples of the test split (0: none).
  config.eval = ml_collections.ConfigDict()
  config.eval.bootstrap_samples = 50

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adamw"  # adamw | adam | sgd | rmsprop
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 1e-4
  # > 0: weight_decay up to this many training examples, scaled by this / their number above
  # (a fixed prior weighs less against more data); 0: weight_decay whatever the data.
  config.optimizer.weight_decay_examples = 0
  config.optimizer.beta1 = 0.9     # adamw
  config.optimizer.beta2 = 0.999   # adamw
  config.optimizer.eps = 1e-8      # adamw
  config.optimizer.momentum = 0.0  # sgd only
  config.optimizer.grad_clip_norm = 8.0  # global norm over all experts; <= 0: none
  config.optimizer.schedule = "cosine"   # cosine | constant
  config.optimizer.warmup_steps = 0

  config.model = ml_collections.ConfigDict()
  config.model.kind = "i2m2"       # i2m2 | intra | inter | uni
  config.model.modality = ""       # the modality of kind 'uni'
  config.model.fusion = "late_fusion"  # the joint expert's fusion: late_fusion | lrtf
  config.model.fusion_kwargs = ml_collections.ConfigDict()  # e.g. {'rank': 40} for lrtf
  # modality -> encoder name, as 'image=cnn,audio=mlp' (settable from the command line).
  config.model.encoders = ""
  # The encoder of every modality `encoders` leaves out; '' for the default by shape
  # (models.default_encoder: flattened when small, else conv1d / cnn).
  config.model.default_encoder = ""
  config.model.encoder_kwargs = ml_collections.ConfigDict()  # modality -> encoder arguments
  config.model.joint_encoder_kwargs = ml_collections.ConfigDict()  # same, for the joint expert
  # Which input keys each expert reads, 'uni_image=image,uni_text=text,joint=fused' ('+' joins
  # several keys); '' for the default: uni_<m> reads m, joint reads every modality.
  config.model.expert_inputs = ""
  # Each expert's head (models.HEADS): 'mlp' (Dense + ReLU per hidden width) or 'fiber' (Dense +
  # LayerNorm + GELU per hidden width, normal(0.02) init: the paper's heads on FIBER features).
  config.model.head = "mlp"
  config.model.head_hidden = (128,)    # the head's hidden widths
  config.model.dropout_rate = 0.0
  # How the classifier is computed: 'plain' (the modules of i2m2_jax/modules.py) or 'fast'
  # (i2m2_jax/fast/: LeNet experts only, same function and variables, faster on CPU).
  config.model.implementation = "plain"
  # Activations in 'float32' or 'bfloat16' (mixed precision: parameters, optimiser state, BatchNorm
  # statistics and the product of experts stay float32). bfloat16 is for GPUs/TPUs, plain only.
  config.model.compute_dtype = "float32"
  # Rematerialise in the backward pass instead of keeping activations: each residual block of a
  # residual encoder (preactresnet18), every other encoder as a whole. Less memory per example
  # for one more forward pass (experiments/benchmark.py measures both). Plain only.
  config.model.remat = False
  # Initialise experts from other runs' best checkpoints: "expert=workdir[,expert=workdir]",
  # e.g. "uni_image=runs/img,joint=runs/lf" (the paper's staged recipe).
  config.model.init_from = ""
  # How `python -m i2m2_jax.main` trains kind i2m2 without init_from: "scratch" (every expert
  # together from a random start) or "experts" (the staged recipe: the uni and inter runs first,
  # in WORKDIR/experts/, then I2M2 fine-tuned from them; i2m2_jax/studies.py train_i2m2).
  config.model.i2m2_init = "scratch"
  # Experts of one architecture (same encoder, head and input shape; fastMRI: all three) computed
  # as one network vmapped over their parameters, which stay one subtree per expert (plain only).
  config.model.stack_experts = False

  config.data = ml_collections.ConfigDict()
  config.data.name = ""
  config.data.data_dir = ""        # TFDS build cache; "" means ~/tensorflow_datasets
  config.data.manual_dir = ""      # folder holding files the user downloaded
  config.data.standardize = True   # inputs standardised with training-split statistics
  # The train and val splits are read into host memory once when each is at most this many GiB
  # (decoding array_record at every batch cannot keep a GPU busy); <= 0: always from the files.
  # The one in-memory setting (datasets.load_dataset applies it).
  config.data.in_memory_max_gb = 4.0
  return config


def shrink_for_smoke(config, *, steps=20, batch_size=32, eval_batch_size=64, eval_every=10,
                     log_every=5, head_hidden=(16,)):
  """The `smoke` argument of every config: a run of a few seconds on CPU, used by the tests.
  head_hidden=None keeps the model as it is (the paper's benchmarks smoke-test real models)."""
  config.num_train_steps = steps
  config.batch_size = batch_size
  config.eval_batch_size = eval_batch_size
  config.eval_every_steps = eval_every
  config.log_every_steps = log_every
  if head_hidden is not None:
    config.model.head_hidden = head_hidden
  return config
