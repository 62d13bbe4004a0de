"""Only the compiled part of the package; everything else is declared in setup.cfg.

``_tarwalk`` (tarindex's header walker, issue 15) is optional: where no C compiler is available the
package installs without it and tarindex uses its pure-Python walker (same results, slower).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("airflow_provider_mmprep._tarwalk", ["airflow_provider_mmprep/_tarwalk.c"],
                             extra_compile_args=["-O3"], optional=True)])
