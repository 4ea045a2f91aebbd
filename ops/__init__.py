"""kiln's op vocabulary: the `kiln::` custom ops the passes rewrite graphs into, each with a pure-torch reference
(the specification) and a fake, plus the attention metadata those ops read. Importing this package declares
every op; `registry.references()` lists them. Imports nothing else of kiln: every other package builds on it.
"""

from . import attention, fused, quant  # noqa: F401  (declares every kiln:: op)
