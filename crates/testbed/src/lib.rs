//! siplb's test bed: a built-in UAS and UAC that speak real SIP over UDP,
//! and the patent's FIG 14-15 scenarios (`siplb demo`).

pub mod demo;
pub mod experiment;
pub mod load;
pub mod uac;
pub mod uas;
