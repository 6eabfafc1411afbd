//! Benchmark harnesses behind `fedmq bench`: each prints JSON, and its figures belong in
//! `docs/BENCHMARKS.md` with the command that produced them. They sit beside the product, not in
//! it: nothing outside `bench` and the command line depends on them.
//!
//! - [`train`]: `fedmq bench train`, forward + backward + optimizer step throughput.
//! - [`blob`]: `fedmq bench blob`, put and get throughput through an S3 store.
//! - [`mqtt`]: `fedmq bench mqtt`, control-message round-trip latency through a broker.
//! - [`round`]: `fedmq bench round`, whole rounds with a no-op trainer and a synthetic model
//!   (server, clients, broker, store; in one process or several).
//! - [`strategies`]: `fedmq bench strategies`, learning quality of strategies side by side on
//!   real data.

pub mod blob;
pub mod mqtt;
pub mod robustness;
pub mod round;
pub mod strategies;
pub mod train;
