import re
from pathlib import Path

from setuptools import find_packages, setup

# one version, in omg/__init__.py (omg --version reads it there)
VERSION = re.search(r'__version__ = "([^"]+)"', (Path(__file__).parent / "omg" / "__init__.py").read_text()).group(1)

setup(
    name="omg",
    version=VERSION,
    description="OMG: occlusion-friendly personalized multi-concept generation with SDXL, in PyTorch + Triton",
    packages=find_packages(include=["omg", "omg.*", "kernels", "kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "safetensors>=0.4",
        "einops>=0.7",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "transformers>=4.44",  # CLIP-L text encoder
        "open-clip-torch>=2.24",  # bundled BPE vocabulary; bigG text tower
        "k-diffusion>=0.1.1,<0.2",  # the samplers besides DDIM (euler, dpmpp_2m, ...)
        "setuptools<81",  # k-diffusion imports clip, which imports pkg_resources (gone from setuptools 81)
        "segment-anything>=1.0",  # --sam: mask refinement
    ],
    extras_require={
        # test-only reference implementations, pinned to the versions the tests were written against
        "test": [
            "torch==2.14.1",
            "torchvision==0.29.1",
            "pytest==9.2.0",
            "diffusers==0.42.1",
            "transformers==5.24.0",
            "open-clip-torch==3.3.0",
            "peft==0.21.2",
            "k-diffusion==0.1.1.post1",
            "setuptools<81",  # k-diffusion -> clip needs pkg_resources
            "segment-anything==1.0",
            "safetensors==0.8.0",
            "ruff==0.17.6",  # `ruff check .` in .ci/run (config: ruff.toml)
            # face detection through the real insightface (tests/test_faces_insightface.py, constructed models)
            "insightface==2.1",
            "onnx==1.23.2",
            "onnxruntime==1.32.0",
            "opencv-python==4.11.0.86",  # insightface's cv2; the last release for numpy 1.x, which dctorch needs
            "scipy==1.17.1",  # insightface's, unpinned there
            "scikit-image==0.26.0",  # insightface's face alignment (SimilarityTransform)
        ],
    },
    entry_points={"console_scripts": ["omg=omg.cli:main"]},
)
