//! Benchmark harnesses that run whole federations: `fedmq bench strategies` (learning quality
//! of strategies side by side). They print JSON and write their tables and figures; figures
//! belong in `docs/BENCHMARKS.md` with the command that produced them.

pub mod strategies;
