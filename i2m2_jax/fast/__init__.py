"""A fast implementation of LeNet-expert classifiers (the paper's AV-MNIST models): same function,
same variables as the plain modules.

An opt-in subpackage: no other module of i2m2_jax imports it at import time, so the plain
modules never load it. `config.model.implementation = 'fast'` makes
`models.build_model` import it and return `build_fast_model`'s `FastLeNetClassifier` instead of
`MultiModalClassifier` for models whose every expert is built from `lenet` encoders
(paper_models.LeNet with its defaults) and, for the joint expert, `late_fusion`: the AV-MNIST
I2M2, intra, inter (LF) and uni-modal models. Anything else raises a ValueError naming the field.

Same function: `apply(variables, inputs, train, present)` returns the same
{'log_probs', 'expert_logits'} as the plain classifier, updates the same BatchNorm statistics in
train mode (PyTorch semantics of paper_models.TorchBatchNorm), and has the same gradients, all to
float32 rounding (tests/test_fast_path.py checks it on the real architecture).

Same variables: the parameter and batch_stats trees are the plain modules' trees, with the same
names, shapes and initial values (each variable is declared at the same path with the same
initialiser, so `init` with the same key gives identical values). Checkpoints, `init_from`, the
optimiser state and weight decay are therefore interchangeable between the two implementations;
`to_plain_variables` / `from_plain_variables` exist for symmetry and only check the tree.

What makes it fast (each measured with experiments/benchmark.py on 2 CPU cores; the README's
Performance section has the numbers):

1. The first block of every expert that reads a modality is computed once for all of them
   (horizontal fusion): the uni-modal LeNet(c=3) and the joint LeNet(c=6) first convolutions
   read the same input, so their kernels are concatenated into one 1 -> 9 channel convolution;
   BatchNorm statistics stay per channel, so this is exact.
2. On CPU, the blocks on images of at least 28x28 pixels (the first block at any even size; for
   AV-MNIST the 112x112, 56x56 and 28x28 blocks, most of the step) run on the C++ kernels of
   cpu_kernels.cc (`conv_bn_relu_pool_cpu`, built on first use): convolution, pooling choice and
   BatchNorm moments in one pass over the batch, split over XLA's intra-op threads, with each
   example's convolution output kept in registers; the backward pass recomputes it and computes
   the kernel and input gradients in a second pass. XLA ran these small-channel convolutions and
   their loops on one thread while much of the step waited for them. Activations stay channels
   first between such blocks. Without a C++ compiler (or with I2M2_JAX_CPU_KERNELS=0), and on
   other backends, 3-5 below run instead.
3. The first block (5x5 convolution -> BatchNorm -> ReLU -> 2x2 max-pool) as one custom
   operation, `stem_bn_relu_pool`: the convolution on the 2x2 space-to-depth of the input is a
   single matrix product per chunk of examples, channels first, whose output rows are the four
   pixels of each pooling window; the chunks go through `lax.map` (in evaluation two independent
   loops) so that patches and outputs stay in cache; BatchNorm statistics are merged exactly over
   chunks; the backward pass recomputes each chunk (4 examples; the forward pass takes up to 20)
   and accumulates the kernel gradient as one matrix product, with no full-resolution gradient
   image in memory.
4. The later blocks: BatchNorm + ReLU + 2x2 max-pool as one operation with a hand-written
   gradient (`bn_relu_pool`): the forward pools first (max, or min where the BatchNorm scale is
   negative: BatchNorm is monotone per channel and ReLU commutes with max), the backward writes
   the convolution output's gradient in one elementwise pass, routing the pooled gradient to the
   first maximal element of each window as XLA's max-pool gradient (select-and-scatter) does.
   Their 3x3 convolutions (`conv3x3`) are padded to 17 output channels where that moves them to
   XLA's fast CPU convolution library, compute the input gradient as a plain convolution with a
   flipped kernel, and sum the kernel gradient over chunks of at most 16 examples.
5. Evaluation: pooling before the BatchNorm affine map (exact, as above), so the affine map and
   ReLU touch a quarter of the elements; the first block is the same matrix product. The 3x3
   convolutions with 3 input channels are computed on the 2x2 space-to-depth of their input
   (`conv3x3_s2d`) and return the pooling windows directly; the others are plain convolutions,
   without channel padding: evaluation is compiled with XLA's own convolutions instead of its
   library (train_lib.compiler_options), which was faster there.

Options of FastLeNetClassifier switch 1-3 off (for measurements and tests); shapes the custom
first block does not handle (odd sizes) fall back to an XLA convolution.

Modules: classifier.py (FastLeNetClassifier, building it from a config; 1), ops.py (the fused
operations and their gradients; 2-5), cpu_kernels.py (builds and calls cpu_kernels.cc).
"""
from i2m2_jax.fast.classifier import FastLeNetClassifier, build_fast_model

__all__ = ["FastLeNetClassifier", "build_fast_model"]
