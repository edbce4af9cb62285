//! `pacer demo`: a local fleet on an embedded broker, printing the sink rate against the
//! budget.

use crate::config::DemoArgs;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("the demo is not available in this build")]
    Unavailable,
}

pub async fn run(_args: DemoArgs) -> Result<(), DemoError> {
    Err(DemoError::Unavailable)
}
