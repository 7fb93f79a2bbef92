"""wam-edge: the on-robot runtime for one-step world action models on the Unitree G1."""

import glob

from setuptools import find_packages, setup

setup(
    name="wam-edge",
    version="0.1.0",
    description="On-robot runtime for one-step world action models (WAMs) on the Unitree G1",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.8",
    packages=find_packages(include=["runtime", "runtime.*", "tools", "tools.*"]),
    install_requires=[
        "numpy>=1.21",  # 1.x on JetPack 5 (Python 3.8), 2.x elsewhere
        "pyzmq>=22",  # the links: image server, chunks, heartbeats, robot state
        "msgpack>=1.0",  # the wire format (no pickle)
        "pyyaml>=5.4",  # config.yaml
        "simplejpeg>=1.6",  # libjpeg-turbo decode of the image server's JPEG frames
    ],
    extras_require={
        # ONNX Runtime: the CPU build for laptops and CI, or NVIDIA's GPU build on a Jetson. Never both.
        "cpu": ["onnxruntime>=1.16"],
        "gpu": ["onnxruntime-gpu>=1.16"],
        # on a Jetson, TensorRT comes with JetPack; polygraphy runs the engines in `wam-edge verify`
        "tensorrt": ["tensorrt>=8.5", "pycuda>=2022.1", "polygraphy>=0.49"],
        "robot": ["cyclonedds==0.10.2"],  # what Unitree's SDK pins; needs CYCLONEDDS_HOME at build time
        # tools/ only (the runtime never imports torch); polygraphy: `wam-edge verify`'s runners
        "export": ["torch>=2.1", "onnx>=1.14", "onnxscript>=0.1", "polygraphy>=0.49"],
        "camera": ["opencv-python-headless>=4.5"],  # V4L2 cameras
        "bench": ["matplotlib>=3.3"],  # `wam-edge bench --plot`; without it the bench writes JSON only
        "dev": ["pytest>=7", "pytest-timeout>=2", "hypothesis>=6", "ruff>=0.4", "vermin>=1.6"],
    },
    data_files=[("share/wam-edge/systemd", sorted(glob.glob("systemd/*.in")))],  # found by `wam-edge install-units`
    entry_points={"console_scripts": ["wam-edge=runtime.cli:main"]},
)
