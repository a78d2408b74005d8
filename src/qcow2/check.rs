//! placeholder
pub enum CheckMode { ReadOnly }
pub struct CheckReport;
