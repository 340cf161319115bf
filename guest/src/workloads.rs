//! The workloads the VMM can select in the boot parameter block.
pub mod crash;
pub mod dirty;
pub mod hello;
pub mod net_echo;
pub mod net_hostile;
pub mod net_stream;
pub mod nvme_malformed;
pub mod nvme_verify;
pub mod probe;
pub mod rdma;
pub mod rdma_hostile;
pub mod spin;
