"""Build of goplug's optional C fast path (everything else is in pyproject.toml).

Without a C compiler the extension is skipped and goplug runs on its pure-Python path.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "goplug._fastpath",
            ["src/goplug/_fastpath.c"],
            optional=True,
            extra_compile_args=["-O2"],
        )
    ]
)
