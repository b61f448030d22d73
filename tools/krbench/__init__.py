"""krdistill's applications: the distillation benchmark, the step-cost tool, the memory probe they
share and the demo (not part of the installed package: benchmarks and measurement tools are
applications, see ``../shared/design/CONVENTIONS.md``).

They use only krdistill's public API (:mod:`krdistill.build`, :mod:`krdistill.io`,
:mod:`krdistill.evaluation`), so a number they report is a number of the code users run. Run them
through the scripts ``tools/benchmark.py``, ``tools/step_cost.py`` and ``tools/demo.py``, which put
``tools/`` on ``sys.path``; tests do the same (``tests/conftest.py``).
"""
