//! BaRS request rules: request ids, header-section size, routes, identity headers, Accept, and the
//! refusals they raise.

pub mod accept;
pub mod errors;
pub mod header_section;
pub mod headers;
pub mod identity;
pub mod ids;
pub mod render;
pub mod routes;
mod settings;
pub mod warnings;

pub use errors::Refusal;
pub use settings::BarsSettings;
