pub mod admin;
pub mod build;
pub mod controller;
pub mod crd;
#[cfg(test)]
mod fixtures;
pub mod metrics;
pub mod reconcile;
#[cfg(test)]
mod scale_tests;
pub mod status;
pub mod validate;
