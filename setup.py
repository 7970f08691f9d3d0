"""Packaging for the xtuner fork (``pip install .`` or ``pip install -e '.[all]'``)."""

import os.path as osp

from setuptools import find_packages, setup

HERE = osp.dirname(osp.abspath(__file__))


def read_requirements(name: str) -> list[str]:
    """Reads ``requirements/NAME.txt``, skipping comments and blank lines."""
    path = osp.join(HERE, "requirements", f"{name}.txt")
    with open(path, encoding="utf-8") as f:
        lines = (line.split("#", 1)[0].strip() for line in f)
        return [line for line in lines if line]


def read_version() -> str:
    scope: dict = {}
    with open(osp.join(HERE, "xtuner", "version.py"), encoding="utf-8") as f:
        exec(f.read(), scope)
    return scope["__version__"]


def read_text(name: str) -> str:
    with open(osp.join(HERE, name), encoding="utf-8") as f:
        return f.read()


deepspeed = read_requirements("deepspeed")
quant = read_requirements("quant")
modelscope = read_requirements("modelscope")

setup(
    name="xtuner",
    version=read_version(),
    description="Fine-tune large language models with XTuner configs and a pluggable loss",
    long_description=read_text("README.md"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(exclude=("tests", "tests.*", "benchmarks", "tools")),
    include_package_data=True,
    install_requires=read_requirements("runtime"),
    extras_require={
        "deepspeed": deepspeed,
        "quant": quant,
        "modelscope": modelscope,
        "all": deepspeed + quant + modelscope,
        "tests": read_requirements("tests"),
    },
    entry_points={"console_scripts": ["xtuner=xtuner.entry_point:cli"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
