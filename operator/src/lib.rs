pub mod admin;
pub mod build;
pub mod controller;
pub mod crd;
#[cfg(test)]
mod fixtures;
pub mod metrics;
pub mod reconcile;
pub mod status;
pub mod validate;
