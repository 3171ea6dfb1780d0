"""Panopticon: an any-sensor foundation model for Earth observation, in the shape of DINOv2."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

CORE = ["torch>=2.1", "torchvision>=0.16", "numpy>=1.24", "omegaconf>=2.3", "pyyaml>=6.0"]
DATA = ["pandas>=2.0", "pyarrow>=14", "h5py>=3.9", "tifffile>=2023.7.10", "rasterio>=1.3", "pillow>=10.0"]
TRAIN = DATA + ["python-dotenv>=1.0", "fire>=0.5", "submitit>=1.5", "tqdm>=4.66", "matplotlib>=3.7"]
EVAL = DATA + ["python-dotenv>=1.0", "fire>=0.5", "tqdm>=4.66", "matplotlib>=3.7"]
# `panopticon embed` / `search`: GeoTIFF/COG in, COG + GeoParquet out, STAC items
EMBED = ["rasterio>=1.3", "pyarrow>=14", "pandas>=2.0", "geopandas>=0.14", "shapely>=2.0", "pystac>=1.8",
         "tqdm>=4.66"]

setup(
    name="panopticon",
    version="0.1.0",
    description="Panopticon: any-sensor foundation model for Earth observation (DINOv2-style)",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["dinov2", "dinov2.*"]),
    package_data={"dinov2": ["configs/**/*.yaml", "configs/*.yaml"]},
    include_package_data=True,
    install_requires=CORE,
    extras_require={
        "data": DATA,
        "train": TRAIN,
        "eval": EVAL,
        "embed": EMBED,
        "wandb": ["wandb>=0.16"],
        "dev": sorted(set(TRAIN + EVAL + EMBED)) + ["pytest>=8.0", "pytest-xdist>=3.5", "timm>=1.0"],
    },
)
