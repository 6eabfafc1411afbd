//! Model parameters as bytes: safetensors in memory, SHA-256 digests.
