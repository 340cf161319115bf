//! Legacy devices every Ferry VM has.
pub mod control;
pub mod serial;
