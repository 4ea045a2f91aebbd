"""The serving runtime: scheduler, paged KV block pool, sampler, detokenizer and the engines built on them.

Import the pieces from their modules (`kiln.runtime.llm.LLM`, `kiln.runtime.engine.LLMEngine`,
`kiln.runtime.async_engine.AsyncLLMEngine`, `kiln.runtime.sampling_params.SamplingParams`, ...); nothing is
imported here, so that `import kiln.runtime` stays cheap.
"""
