from setuptools import find_packages, setup

setup(
    name="i2m2_jax",
    version="0.1.0",
    description="I2M2 (inter- and intra-modality modelling) for multi-modal classification in JAX/Flax",
    packages=find_packages(include=["i2m2_jax", "i2m2_jax.*"]),
    # The fast path's C++ CPU kernels, built on first use (i2m2_jax/fast/cpu_kernels.py).
    package_data={"i2m2_jax.fast": ["cpu_kernels.cc"]},
    python_requires=">=3.11",
    # Lower bounds are the versions tested on Python 3.11 (JAX 0.10, the last JAX for 3.11);
    # Python 3.12+ gets the newest JAX it allows. Upper bounds only where an API we use is
    # known to move at the next major version.
    install_requires=[
        "jax>=0.10",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8,<0.13",
        "tensorflow-datasets>=4.9.10,<5",
        "importlib_resources>=6",  # TFDS needs it without TensorFlow but does not declare it
        "grain>=0.2.18",
        "array-record>=0.8.6",
        "ml-collections>=1.1.0",
        "chex>=0.1.92",
        "absl-py",
        "numpy",
        "scikit-learn",
        "tensorboardX",
        "tqdm",
        "matplotlib",
        "h5py",  # fastMRI's HDF5 volumes
        "flatbuffers",  # jax.export's serialisation (i2m2_jax/export.py)
    ],
    extras_require={
        "test": ["pytest"],
        "cuda": ["jax[cuda13]"],  # NVIDIA GPUs (CUDA 13 wheels)
        "tpu": ["jax[tpu]"],      # Cloud TPU VMs
    },
)
