pub mod build;
pub mod crd;
pub mod status;
pub mod validate;
