//! SIDR (service ID resolution): the SIDR_REQ → SIDR_REP exchange udaddy uses before UD sends.
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use rdma_wire::{Gid, Mad};
use serde::{Deserialize, Serialize};

use crate::RdmaError;

/// The answer to a SIDR request: where to send UD messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SidrInfo {
    /// The service's QPN.
    pub qpn: u32,
    /// The service's Q_Key.
    pub qkey: u32,
}

/// An outstanding SIDR_REQ.
#[derive(Debug)]
pub(crate) struct SidrOut {
    pub dgid: Gid,
    pub service_id: u64,
    pub mad: Box<Mad>,
    pub retries_left: u8,
    pub timeout: Duration,
    pub deadline: Instant,
    pub waiter: Sender<Result<SidrInfo, RdmaError>>,
}
