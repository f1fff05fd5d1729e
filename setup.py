"""Packaging hook: the shipped learned optimizers travel in the wheel.

`checkpoints/` stays their home in the repository; a built wheel carries a copy as
`lopt/shipped/`, where `lopt.pretrained` finds them once installed (everything else is in
pyproject.toml).
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithCheckpoints(build_py):
    """`build_py` that also copies `checkpoints/` to `lopt/shipped/` in the build."""

    def run(self):
        super().run()
        source = Path(__file__).resolve().parent / "checkpoints"
        if source.is_dir() and not self.editable_mode:
            shutil.copytree(source, Path(self.build_lib) / "lopt" / "shipped", dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithCheckpoints})
