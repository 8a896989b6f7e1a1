"""loopgpt: a serving stack for loop-residual GPT models (train, serve, export, load-test).

    loopgpt --help
"""

__version__ = "0.1.0"
