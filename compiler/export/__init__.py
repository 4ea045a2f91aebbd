"""A compiled model leaving the process: artifacts (`artifact`, with the generated `forward_source`), and MLIR
(`mlir_export`, over the functional graph `decompositions` makes)."""
