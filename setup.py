"""Only the compiled part of the package; everything else is declared in setup.cfg.

Both extensions are optional: where no C compiler is available the package installs without them and the
pure-Python paths run instead, with the same results, slower.

- ``_tarwalk`` (issue 15): tarindex's header walker;
- ``_resample`` (issue 14): download_images' BOX shrink of decoded JPEGs, Pillow's arithmetic vectorised.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("airflow_provider_mmprep._tarwalk", ["airflow_provider_mmprep/_tarwalk.c"],
                             extra_compile_args=["-O3"], optional=True),
                   Extension("airflow_provider_mmprep._resample", ["airflow_provider_mmprep/_resample.c"],
                             extra_compile_args=["-O3"], optional=True)])
