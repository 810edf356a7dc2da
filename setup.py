"""Installs ``fasq-hook.pth`` next to the package (everything else is in pyproject.toml).

Its one line runs ``_fasq_hook.install()`` at interpreter start, so that transformers' ``from_pretrained``
loads fasq models without ``import fasq`` (src/_fasq_hook.py says why and what it costs).  A build
sub-command writes it at the root of what is installed: ``build_lib`` for wheels (``pip install .``),
and for editable installs (``pip install -e .``, where setuptools puts only a path .pth in the wheel and
runs the build sub-commands with ``editable_mode`` set) straight into the editable wheel.
"""
from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build import build

PTH_NAME = "fasq-hook.pth"
PTH_LINE = "import _fasq_hook; _fasq_hook.install()\n"


class build_fasq_pth(Command):
    description = f"write {PTH_NAME}"
    user_options = []
    editable_mode = False

    def initialize_options(self):
        self.build_lib = None

    def finalize_options(self):
        self.set_undefined_options("build", ("build_lib", "build_lib"))

    def _target_dir(self) -> str:
        if self.editable_mode:  # editable_wheel points install_lib at the wheel it is making
            return self.get_finalized_command("install").install_lib
        return self.build_lib

    def run(self):
        path = Path(self._target_dir(), PTH_NAME)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(PTH_LINE)

    def get_outputs(self):
        return [] if self.editable_mode else [str(Path(self.build_lib, PTH_NAME))]

    def get_output_mapping(self):
        return {}


class build_with_pth(build):
    sub_commands = build.sub_commands + [("build_fasq_pth", None)]


setup(cmdclass={"build": build_with_pth, "build_fasq_pth": build_fasq_pth})
