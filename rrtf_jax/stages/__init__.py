"""The pipeline stages, one module each: evolve, sample, rank, prepare, train, params,
evaluate, check and quantize (`rrtf <stage>`); imported on use, so the CLI starts fast."""
