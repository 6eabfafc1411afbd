//! candle models, optimizers, the local trainer and the training benchmark.
