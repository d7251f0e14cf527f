"""Build hook for the optional C kernel; all metadata lives in pyproject.toml.

The extension needs only the Python headers and a C compiler (never torch). If it cannot be
built, installation still succeeds and mixprec falls back to its pure-torch kernels.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            print(f"mixprec: C kernel not built ({exc}); using the torch fallback")

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            print(f"mixprec: C kernel not built ({exc}); using the torch fallback")


setup(
    ext_modules=[
        Extension(
            "mixprec.quantization._kernels",
            sources=["src/mixprec/quantization/_kernels.c"],
            extra_compile_args=["-O3", "-fno-math-errno"],
            optional=True,
        ),
        Extension(
            "mixprec.sanitizer._checks",
            sources=["src/mixprec/sanitizer/_checks.c"],
            extra_compile_args=["-O3", "-fno-math-errno"],
            optional=True,
        ),
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
