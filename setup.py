"""Build the optional C extension ``mimscale.data._jpeg_region`` (crop-region JPEG decoding).

Everything else about the package lives in ``pyproject.toml``. The extension needs libjpeg-turbo's
development files (Debian/Ubuntu: ``libjpeg62-turbo-dev`` or ``libjpeg-turbo8-dev``; RHEL:
``libjpeg-turbo-devel``; conda: ``libjpeg-turbo``). It is ``optional``: where they are missing the
install still succeeds, and the data pipeline decodes whole images with simplejpeg instead
(``mimscale.data.transforms.REGION_DECODE`` says which path is active).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mimscale.data._jpeg_region",
            sources=["mimscale/data/_jpeg_region.c"],
            libraries=["jpeg"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
