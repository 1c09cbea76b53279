from setuptools import find_packages, setup

setup(
    name="i2m2_jax",
    version="0.1.0",
    description="I2M2 (inter- and intra-modality modelling) for multi-modal classification in JAX/Flax",
    packages=find_packages(include=["i2m2_jax", "i2m2_jax.*"]),
    package_data={"i2m2_jax.fast": ["cpu_kernels.cc"]},  # built on first use (cpu_kernels.py)
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10,<0.11",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "tensorflow-datasets==4.9.10",
        "importlib_resources>=6",  # TFDS needs it without TensorFlow but does not declare it
        "grain==0.2.18",
        "array-record==0.8.6",
        "ml-collections==1.1.0",
        "chex==0.1.92",
        "absl-py",
        "numpy",
        "scikit-learn",
        "tensorboardX",
        "tqdm",
        "matplotlib",
    ],
    extras_require={"test": ["pytest"]},
)
