from setuptools import find_packages, setup

setup(
    name="int4tensor",
    version="0.1.0",
    description="Int4 weight-only quantization for PyTorch as tensor subclasses",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["int4tensor", "int4tensor.*"]),
    python_requires=">=3.10",
    # numpy: save_file writes tensors through numpy buffers, and torch warns "Failed to
    # initialize NumPy" on first use without it
    install_requires=["torch>=2.6", "safetensors>=0.4", "tqdm", "numpy"],
    extras_require={
        # transformers and compressed-tensors: interop tests load our exports with them
        "test": ["pytest>=7", "expecttest", "hypothesis", "transformers", "compressed-tensors"],
        "gpu": ["fbgemm-gpu-genai"],
    },
    entry_points={"console_scripts": ["int4tensor=int4tensor.cli:main"]},
)
