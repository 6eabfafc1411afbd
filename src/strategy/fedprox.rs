//! FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks"): clients
//! minimise their loss plus `(μ/2)·‖w − w_global‖²`, which keeps local models near the global
//! one on heterogeneous data; the server averages as FedAvg does. The proximal term travels as
//! the strategy instruction `proximal_mu` (docs/PROTOCOL.md) and is applied by the clients'
//! optimizer layer.

use super::fedavg::StreamingMean;
use super::{RoundAggregate, Strategy};
use crate::proto::{StrategyInstruction, STRATEGY_INSTRUCTION_VERSION};
use crate::tensor::ParamSet;

/// FedAvg aggregation with a proximal term on every client.
#[derive(Debug, Clone, PartialEq)]
pub struct FedProx {
    /// The proximal coefficient `μ` (≥ 0; 0 is FedAvg).
    pub mu: f64,
}

impl Strategy for FedProx {
    fn secure_aggregation(&self) -> std::result::Result<(), String> {
        Ok(())
    }

    fn name(&self) -> &'static str {
        "FedProx"
    }

    fn instruction(&self, _round: u64, _client: &str) -> Option<StrategyInstruction> {
        Some(StrategyInstruction {
            name: self.name().into(),
            version: STRATEGY_INSTRUCTION_VERSION,
            params: [("proximal_mu".to_string(), self.mu)].into(),
        })
    }

    fn begin_round(&mut self, _round: u64, global: &ParamSet) -> Box<dyn RoundAggregate> {
        Box::new(StreamingMean::new(global))
    }
}
